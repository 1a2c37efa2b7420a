"""FRoD: the weight re-expressed in a basis shared by one projection role across layers, then re-scaled.

PEFT forward (peft/tuners/frod/layer.py, FrodLayer._calculate_frod_u_and_lambda / Linear.forward):
  V (in × in) is shared by every layer of one role ("category", e.g. self_attn_q_proj) and saved at
  base_model.frod_V.<category>, with the sparse pattern frod_s_indices/frod_s_size.<category>;
  B = W V⁻ᵀ (fp64 solve, pinv if singular), λ₀ = column norms of B, U = B / λ₀ (so W = U diag(λ₀) Vᵀ);
  y = U (S + diag(λ)) Vᵀ x + b,  S sparse (in × in) with the trained frod_lambda_s_values, λ = frod_lambda_l.
The no-op is λ = λ₀, S = 0 (λ₀ and U recomputed from W, as PEFT does at load); the linear scheme moves both
from there: λ(c) = λ₀ + c(λ − λ₀), S(c) = c·S, held as `mix` = c. The merge writes
W + U (S(c) + diag(λ(c) − λ₀)) Vᵀ, so c = 0 is the base exactly. Conv1D works in the same Linear orientation.
"""

from __future__ import annotations

import torch

from ..errors import AdapterError
from .base import AdapterFamily, ModuleState, Scheme, require, scale_mix, shape_error, split_keys, toward

LAMBDA, SPARSE = "frod_lambda_l", "frod_lambda_s_values"
SHARED = ("frod_V", "frod_s_indices", "frod_s_size")


class FRoD(AdapterFamily):
    name = "FRoD"
    peft_types = ("FROD",)
    tokens = (LAMBDA, SPARSE)
    shared_tokens = SHARED
    schemes = {
        "linear": Scheme("linear", "λ → λ₀ + c(λ − λ₀), S → c·S", "0: base · 1: trained · −1: W − ΔW", scale_mix),
    }

    def refusal(self, config):
        if not config.get("save_projection", True):
            return (
                "it was saved without its shared bases (save_projection=False). PEFT rebuilds them from every targeted "
                "base weight of a role at load (a joint decomposition across layers), which a streaming merge does not "
                "do. Re-save the adapter with save_projection=True."
            )
        return None

    def parse(self, config, tensors, base_shapes, options):
        modules, _, shared = split_keys(tensors, self.tokens, self.shared_tokens)
        fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
        states = []
        for path, params in modules.items():
            require(params, path, LAMBDA, SPARSE)
            category = _category(path)
            names = [f"{name}.{category}" for name in SHARED]
            missing = [n for n in names if n not in shared]
            if missing:
                raise AdapterError(
                    f"FRoD module {path} (role {category!r}) has no shared {', '.join(missing)}; the adapter file is incomplete."
                )
            basis, indices, size = (shared[n] for n in names)
            tensors_ = {**params, "frod_V": basis, "frod_s_indices": indices.long(), "frod_s_size": size.long()}
            states.append(ModuleState(path, tensors_, {"mix": 1.0}, fan_in_fan_out=fan_in_fan_out))
        return states

    def check_shapes(self, state, weight_shape, bias_shape):
        basis = state.tensors["frod_V"]
        if basis.shape != (weight_shape[1], weight_shape[1]) or state.tensors[LAMBDA].numel() != weight_shape[1]:
            raise shape_error(
                state.path, "input features (frod_V of its role)", tuple(basis.shape[:1]), weight_shape[1]
            )

    def weight(self, state, weight):
        basis = state.tensors["frod_V"].float()
        left, identity = frod_u_and_lambda(basis, weight)
        mix = state.scalars["mix"]
        core = torch.diag(toward(identity, state.tensors[LAMBDA], mix) - identity)
        rows, cols = state.tensors["frod_s_indices"]
        core = core.index_put((rows, cols), mix * state.tensors[SPARSE], accumulate=True)
        return weight + left @ core @ basis.T

    # ---- runtime ---------------------------------------------------------------------------------
    def live_state(self, layer, adapter, path):
        tensors = {
            LAMBDA: layer.frod_lambda_l[adapter].detach().clone(),
            SPARSE: layer.frod_lambda_s_values[adapter].detach().clone(),
        }
        return ModuleState(path, tensors, {"mix": 1.0}, fan_in_fan_out=layer.fan_in_fan_out)

    def set_live_state(self, layer, adapter, state):
        base = layer.get_base_layer().weight.detach().float()
        _, identity = frod_u_and_lambda(layer.frod_V[adapter].float(), base.T if layer.fan_in_fan_out else base)
        mix = state.scalars["mix"]
        layer.frod_lambda_l[adapter].data.copy_(toward(identity, state.tensors[LAMBDA], mix))
        layer.frod_lambda_s_values[adapter].data.copy_(
            state.tensors[SPARSE] if mix == 1.0 else mix * state.tensors[SPARSE]
        )


    def rederive_live(self, layer, adapter):
        """FrodLayer.update_layer computes U from frod_V when it builds the layer, not when frod_V is loaded later."""
        weight = layer.get_base_layer().weight
        u, _ = layer._calculate_frod_u_and_lambda(layer.frod_V[adapter].to(weight.dtype), weight.T if layer.fan_in_fan_out else weight)
        layer.frod_U[adapter] = u.to(weight.dtype)


def frod_u_and_lambda(basis: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FrodLayer._calculate_frod_u_and_lambda: W = U diag(λ₀) Vᵀ, computed in fp64 on the CPU, returned fp32."""
    w, v = weight.detach().double().cpu(), basis.detach().double().cpu()
    try:
        b = torch.linalg.solve(v, w.T).T
    except RuntimeError:
        b = w @ torch.linalg.pinv(v, rtol=1e-6).T
    norms = torch.linalg.norm(b, dim=0)
    u = torch.zeros_like(b)
    nonzero = norms > 1e-12
    u[:, nonzero] = b[:, nonzero] / norms[nonzero]
    return u.float().to(weight.device), norms.float().to(weight.device)


def _category(path: str) -> str:
    """peft/tuners/frod/model.py _category_from_key: the role shared across blocks, from the last path parts."""
    parts = path.split(".")
    if len(parts) == 1:
        return parts[0]
    if parts[-2].isdigit():
        return parts[-1]
    category = f"{parts[-2]}_{parts[-1]}"
    if category == "output_dense" and len(parts) >= 3 and parts[-3] == "attention":
        return "attention_output"
    return category

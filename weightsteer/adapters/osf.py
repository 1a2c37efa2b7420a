"""OSF (orthogonal subspace fine-tuning): the low singular part of W retrained, the high part frozen.

PEFT forward (peft/tuners/osf/layer.py, Linear.forward / get_delta_weight; utils.decompose_weight_matrix):
  W = U S Vᵀ (fp32 torch.linalg.svd);  the top k directions stay, the rest start as U₀ S₀ V₀ = U[:, k:] S[k:] Vᵀ[k:]
  y = W x + b + (U_low diag(S_low) V_low − U₀ diag(S₀) V₀) x
The initial low part is not saved: PEFT recomputes it from the base weight at load, and so does the merge
(k = min(out, in) − len(S_low)); u s vᵀ per direction does not depend on SVD signs. ΔW is linear in the
pair (S_low, S₀) (no-op 0): the linear scheme scales both by c, giving W + c·ΔW; S₀ is scaled through
`init_mix` where W is known. nn.Linear only.
"""

from __future__ import annotations

import torch

from .base import ModuleState, Scheme, require, shape_error, split_keys
from .scaled_delta import TensorDictFamily

U, S, V = "osf_svd_params.U_low", "osf_svd_params.S_low", "osf_svd_params.V_low"
S_INIT = "S_low_init"  # the live layer's _osf_S_low_init (runtime states only)


def _scale(state: ModuleState, c: float) -> ModuleState:
    scaled = state.with_tensors(**{S: c * state.tensors[S]})
    return scaled.with_scalars(init_mix=c * state.scalars["init_mix"])


class OSF(TensorDictFamily):
    name = "OSF"
    peft_types = ("OSF",)
    tokens = ("osf_svd_params",)
    nested = True
    schemes = {
        "linear": Scheme("linear", "S_low → c·S_low and S₀ → c·S₀", "0: base · 1: trained · −1: W − ΔW", _scale),
    }

    def knob_names(self):
        return (U, S, V)

    def parse(self, config, tensors, base_shapes, options):
        modules, _, _ = split_keys(tensors, self.tokens, nested=self.nested)
        for path, params in modules.items():
            require(params, path, U, S, V)
        return [ModuleState(path, params, {"init_mix": 1.0}) for path, params in modules.items()]

    def check_shapes(self, state, weight_shape, bias_shape):
        expected = (state.tensors[U].shape[0], state.tensors[V].shape[1])
        if tuple(weight_shape) != expected or state.tensors[S].numel() > min(weight_shape):
            raise shape_error(state.path, "weight shape", expected, tuple(weight_shape))

    def weight(self, state, weight):
        u0, s0, v0 = initial_low_part(weight, state.tensors[S].numel())
        trained = (state.tensors[U] * state.tensors[S]) @ state.tensors[V]
        return weight + trained - (u0 * (state.scalars["init_mix"] * s0)) @ v0

    # ---- runtime: the initial low part lives in the layer's _osf_*_low_init buffers ------------------------
    def live_state(self, layer, adapter, path):
        state = super().live_state(layer, adapter, path)
        state.tensors[S_INIT] = layer._osf_S_low_init[adapter].detach().clone()
        return state.with_scalars(init_mix=1.0)

    def set_live_state(self, layer, adapter, state):
        super().set_live_state(layer, adapter, state)
        mix = state.scalars["init_mix"]
        layer._osf_S_low_init[adapter] = state.tensors[S_INIT] if mix == 1.0 else mix * state.tensors[S_INIT]


def initial_low_part(weight: torch.Tensor, low_rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """decompose_weight_matrix: the trailing `low_rank` singular triplets of W (fp32 SVD)."""
    u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    k = s.numel() - low_rank
    return u[:, k:], s[k:], vh[k:, :]

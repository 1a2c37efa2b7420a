"""RandLoRA: full-rank updates from frozen random bases shared by all layers, scaled by trained λ and γ.

PEFT forward (peft/tuners/randlora/layer.py, Linear.get_scaled_bases / forward):
  Ã = flatten₀₁(λ[:, :, None] ⊙ A[:, :nb, :min] ⊙ γ[None])   (r·nb × min; A's middle dim 1 broadcasts)
  B̃ = flatten₁₂(B[:max, :nb, :])                             (max × nb·r)
  in ≤ out:  y = W x + b + s·B̃ Ã x      in > out:  y = W x + b + s·Ãᵀ B̃ᵀ x,    s = α/r
The two flattenings are rank-major (Ã) and basis-major (B̃) and are contracted by position, not basis
by basis; reproduced literally. randlora_A (r, 1, min_max) and randlora_B (max_max, nb_max, r) are
saved at base_model.randlora_A/B (plus an identical copy under every module, ignored here), or, with
save_projection=False, regenerated from projection_prng_key (peft/tuners/randlora/model.py).
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

from ..errors import AdapterError
from .base import AdapterFamily, ModuleState, Scheme, ShapeLookup, require, scale_scaling, shape_error, split_keys

TRAINED = ("randlora_lambda", "randlora_gamma")
BASES = ("randlora_A", "randlora_B")



class RandLoRA(AdapterFamily):
    name = "RandLoRA"
    peft_types = ("RANDLORA",)
    # The bases are tokens too, so that the per-module duplicate copies are recognised (and dropped).
    tokens = (*TRAINED, *BASES)
    shared_tokens = BASES
    knobs = ("scaling",)
    schemes = {
        "linear": Scheme(
            "linear",
            "scaling → c·scaling",
            "0: base · 1: trained · −1: W − ΔW",
            scale_scaling,
        ),
    }

    def knob_names(self) -> tuple[str, ...]:
        return (*TRAINED, *self.knobs)

    def parse(self, config, tensors, base_shapes, options):
        modules, _, shared = split_keys(tensors, self.tokens, self.shared_tokens)
        for path, params in modules.items():
            require(params, path, *TRAINED)
        if modules and not all(name in shared for name in BASES):
            # PEFT always draws the bases at injection, then loads whatever the file stores over them.
            shared = {**_regenerate(config, modules, base_shapes), **shared}
        scaling = config.get("randlora_alpha", 640) / config.get("r", 32)
        fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
        return [
            ModuleState(
                path, {**{n: params[n] for n in TRAINED}, **shared}, {"scaling": scaling}, fan_in_fan_out=fan_in_fan_out
            )
            for path, params in modules.items()
        ]

    def check_shapes(self, state, weight_shape, bias_shape):
        small, large = min(weight_shape), max(weight_shape)
        lam, gamma = state.tensors["randlora_lambda"], state.tensors["randlora_gamma"]
        base_a, base_b = state.tensors["randlora_A"], state.tensors["randlora_B"]
        if gamma.shape[1] != small:
            raise shape_error(state.path, "min(out, in) (width of randlora_gamma)", gamma.shape[1], small)
        if lam.shape[1] != gamma.shape[0]:
            raise AdapterError(
                f"RandLoRA module {state.path}: randlora_lambda has {lam.shape[1]} bases but randlora_gamma has "
                f"{gamma.shape[0]}; the adapter file is inconsistent."
            )
        if base_a.shape[0] != lam.shape[0] or base_b.shape[2] != lam.shape[0]:
            raise AdapterError(
                f"RandLoRA module {state.path}: randlora_lambda has rank {lam.shape[0]} but the shared bases have rank "
                f"{base_a.shape[0]} (randlora_A) and {base_b.shape[2]} (randlora_B); the adapter file is inconsistent."
            )
        if base_a.shape[2] < small or base_b.shape[0] < large or base_b.shape[1] < lam.shape[1]:
            raise shape_error(
                state.path,
                "the shared bases must cover the layer's (min, max) dimensions",
                f"at most ({base_a.shape[2]}, {base_b.shape[0]})",
                (small, large),
            )

    def weight(self, state, weight):
        out_features, in_features = weight.shape
        small, large = min(out_features, in_features), max(out_features, in_features)
        lam, gamma = state.tensors["randlora_lambda"], state.tensors["randlora_gamma"]
        num_bases = lam.shape[1]
        sliced_a = state.tensors["randlora_A"][:, :num_bases, :small]
        sliced_b = state.tensors["randlora_B"][:large, :num_bases, :]
        scaled_a = (lam[:, :, None] * sliced_a * gamma[None]).flatten(end_dim=1)  # (r·nb, min), rank-major
        flat_b = sliced_b.flatten(start_dim=1)  # (max, nb·r), basis-major
        delta = flat_b @ scaled_a if small == in_features else scaled_a.T @ flat_b.T
        return weight + state.scalars["scaling"] * delta

    # ---- runtime ---------------------------------------------------------------------------------
    def live_state(self, layer, adapter, path):
        tensors = {name: getattr(layer, name)[adapter].detach().clone() for name in TRAINED}
        # The bases are shared buffers that no scheme changes: referenced, not copied.
        tensors.update({name: getattr(layer, name)[adapter] for name in BASES})
        return ModuleState(path, tensors, {"scaling": layer.scaling[adapter]}, fan_in_fan_out=layer.fan_in_fan_out)

    def set_live_state(self, layer, adapter, state):
        layer.scaling[adapter] = state.scalars["scaling"]
        for name in TRAINED:
            getattr(layer, name)[adapter].data.copy_(state.tensors[name])


def _regenerate(
    config: dict, modules: Mapping[str, Mapping[str, torch.Tensor]], base_shapes: ShapeLookup
) -> dict[str, torch.Tensor]:
    """randlora_A, randlora_B as RandLoraModel._pre_injection_hook draws them, sized by the elementwise
    largest (out, in) over all adapted modules (RandLoraModel._find_dim)."""
    shapes = [_layer_shape(base_shapes, path) for path in modules]
    largest = [max(dims) for dims in zip(*shapes)]
    small, large = min(largest), max(largest)
    rank = int(config.get("r", 32))
    num_bases = math.ceil(small / rank)
    generator = torch.Generator(device="cpu").manual_seed(int(config.get("projection_prng_key", 0)))
    if config.get("very_sparse"):
        return _sparse_bases(rank, small, large, num_bases, generator, sparsity=math.sqrt(small))
    if config.get("sparse"):
        return _sparse_bases(rank, small, large, num_bases, generator, sparsity=3)
    return _dense_bases(rank, small, large, num_bases, generator)


def _dense_bases(
    rank: int, small: int, large: int, num_bases: int, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """RandLoraModel._init_randlora_A_randlora_B: kaiming-uniform draws in bfloat16 (PEFT's `_kaiming_init`
    uses bf16 wherever accelerate reports bf16 support, i.e. every CPU and bf16 GPU), A then nb slices of B,
    each basis divided by its own std in bf16."""
    base_a = _kaiming_bf16((rank, 1, small), generator)
    base_b = torch.cat([_kaiming_bf16((large, 1, rank), generator) for _ in range(num_bases)], dim=1)
    return {"randlora_A": (base_a / base_a.std()).float(), "randlora_B": (base_b / base_b.std()).float()}


def _kaiming_bf16(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return torch.nn.init.kaiming_uniform_(torch.empty(shape, dtype=torch.bfloat16), a=math.sqrt(5), generator=generator)


def _sparse_bases(
    rank: int, small: int, large: int, num_bases: int, generator: torch.Generator, sparsity: float
) -> dict[str, torch.Tensor]:
    """RandLoraModel._init_randlora_A_randlora_B_sparse: ternary {−1, 0, 1} bases, P(±1) = 1/(2·sparsity) each."""
    draws = {
        "randlora_A": torch.rand((rank, 1, small), generator=generator),
        "randlora_B": torch.rand((large, num_bases, rank), generator=generator),
    }
    bases = {}
    for name, draw in draws.items():
        ternary = torch.zeros(draw.shape)
        ternary[draw < 1 / (2 * sparsity)] = -1
        ternary[draw > 1 - 1 / (2 * sparsity)] = 1
        bases[name] = ternary / ternary.std()
    return bases


def _layer_shape(base_shapes: ShapeLookup, path: str) -> tuple[int, int]:
    shape = base_shapes.weight(path)
    if shape is None or len(shape) != 2:
        raise AdapterError(
            f"RandLoRA module {path}: the base has no 2-D tensor {path}.weight. This adapter was saved without its "
            "random bases (save_projection=False); they are regenerated from projection_prng_key and sized by the "
            "base layers, so the base must be the model the adapter was trained on."
        )
    # Only min and max of the elementwise-largest shape matter, so Conv1D's in × out order needs no flip.
    return shape[0], shape[1]

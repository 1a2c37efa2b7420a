"""VeRA (and PVeRA): frozen random projections shared by all layers, scaled by two trained vectors per layer.

PEFT forward (peft/tuners/vera/layer.py, Linear.forward / get_delta_weight):
  y = W x + b + λ_b ⊙ (B_s (λ_d ⊙ (A_s x))),   A_s = vera_A[:, :in],  B_s = vera_B[:out, :]
so W' = W + diag(λ_b) B_s diag(λ_d) A_s; the bias is untouched. vera_A (r × max_in) and vera_B
(max_out × r) are saved once at base_model.vera_A/B, or, with save_projection=False, regenerated
from projection_prng_key (peft/tuners/vera/model.py, VeraModel._init_vera_A_vera_B).
"""

from __future__ import annotations

import math
from typing import ClassVar, Mapping

import torch

from ..errors import AdapterError
from .base import AdapterFamily, LowRankChange, ModuleState, Scheme, ShapeLookup, require, shape_error, split_keys


def _scale_lambda_b(state: ModuleState, c: float) -> ModuleState:
    # ΔW is linear in λ_b, whose no-op value is 0: λ_b(c) = c·λ_b gives W + c·ΔW.
    return state.with_tensors(**{n: c * t for n, t in state.tensors.items() if n.endswith("_lambda_b")})


class VeRA(LowRankChange, AdapterFamily):
    name = "VeRA"
    peft_types = ("VERA",)
    prefix: ClassVar[str] = "vera"
    tokens = ("vera_lambda_b", "vera_lambda_d")
    shared_tokens = ("vera_A", "vera_B")
    # PVeRA draws A with twice the rank and uses its first half (and λ_d's) at inference.
    rank_split: ClassVar[int] = 1
    schemes = {
        "linear": Scheme(
            "linear",
            "λ_b → c·λ_b",
            "0: base · 1: trained · −1: W − ΔW",
            _scale_lambda_b,
        ),
    }

    def parse(self, config, tensors, base_shapes, options):
        modules, _, shared = split_keys(tensors, self.tokens, self.shared_tokens)
        fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
        for path, params in modules.items():
            require(params, path, *self.tokens)
        if modules and not all(name in shared for name in self.shared_tokens):
            # PEFT always draws the projections at injection, then loads whatever the file stores over them.
            shared = {**self._regenerate(config, modules, base_shapes, fan_in_fan_out), **shared}
        # Every state refers to the same shared tensors; weight() slices them per module.
        return [
            ModuleState(path, {**params, **shared}, fan_in_fan_out=fan_in_fan_out) for path, params in modules.items()
        ]

    def check_shapes(self, state, weight_shape, bias_shape):
        out_features, in_features = weight_shape
        lambda_b, lambda_d, vera_a, vera_b = self._tensors(state)
        if lambda_b.numel() != out_features:
            raise shape_error(state.path, f"output features (length of {self.prefix}_lambda_b)", lambda_b.numel(), out_features)
        if vera_a.shape[1] < in_features or vera_b.shape[0] < out_features:
            raise shape_error(
                state.path,
                f"the shared projections {self.prefix}_A/{self.prefix}_B must cover the layer's (out, in)",
                f"at most ({vera_b.shape[0]}, {vera_a.shape[1]})",
                (out_features, in_features),
            )
        if not lambda_d.numel() == vera_a.shape[0] == vera_b.shape[1] * self.rank_split:
            raise AdapterError(
                f"{self.name} module {state.path}: {self.prefix}_lambda_d has length {lambda_d.numel()} but the shared "
                f"projections have rank {vera_a.shape[0]} ({self.prefix}_A) and {vera_b.shape[1]} ({self.prefix}_B); "
                "the adapter file is inconsistent."
            )


    def low_rank(self, state, shape):
        """ΔW = (diag(λ_b) B_s) (diag(λ_d) A_s), with the projections sliced to the layer's (out, in)."""
        out_features, in_features = shape
        lambda_b, lambda_d, vera_a, vera_b = self._tensors(state)
        used = lambda_d.numel() // self.rank_split  # PVeRA: the first half (the mean) at inference
        sliced_a = vera_a[:used, :in_features]
        sliced_b = vera_b[:out_features, :]
        return lambda_b.unsqueeze(1) * sliced_b, lambda_d[:used].unsqueeze(1) * sliced_a

    def _tensors(self, state: ModuleState) -> tuple[torch.Tensor, ...]:
        """λ_b, λ_d, A, B."""
        return tuple(state.tensors[n] for n in (*self.tokens, *self.shared_tokens))

    # ---- runtime ---------------------------------------------------------------------------------
    def live_state(self, layer, adapter, path):
        tensors = {name: getattr(layer, name)[adapter].detach().clone() for name in self.tokens}
        # The projections are shared buffers that no scheme changes: referenced, not copied.
        tensors.update({name: getattr(layer, name)[adapter] for name in self.shared_tokens})
        return ModuleState(path, tensors, fan_in_fan_out=layer.fan_in_fan_out)

    def set_live_state(self, layer, adapter, state):
        for name in self.tokens:
            getattr(layer, name)[adapter].data.copy_(state.tensors[name])

    def _regenerate(
        self, config: dict, modules: Mapping[str, Mapping[str, torch.Tensor]], base_shapes: ShapeLookup, fan_in_fan_out: bool
    ) -> dict[str, torch.Tensor]:
        """A, B as VeraModel._init_vera_A_vera_B (PveraModel._init_pvera_A_pvera_B) draws them: sized by the largest
        (out, in) over all adapted modules (_find_dim), from a CPU generator seeded with projection_prng_key, A first.
        A has as many rows as λ_d; B has r = len(λ_d) / rank_split columns."""
        shapes = [_linear_shape(self.name, base_shapes, path, fan_in_fan_out) for path in modules]
        max_out = max(out for out, _ in shapes)
        max_in = max(in_ for _, in_ in shapes)
        rows = next(iter(modules.values()))[self.tokens[1]].numel()
        generator = torch.Generator(device="cpu").manual_seed(int(config.get("projection_prng_key", 0)))
        vera_a = _kaiming_uniform((rows, max_in), generator)
        vera_b = _kaiming_uniform((max_out, rows // self.rank_split), generator)
        return dict(zip(self.shared_tokens, (vera_a, vera_b)))


class PVeRA(VeRA):
    """PVeRA (peft/tuners/pvera/layer.py, Linear.forward / get_delta_weight): VeRA whose λ_d ⊙ A x is split into
    a mean and a log-variance; at inference (sample_at_inference=False) only the mean is used:
      y = W x + b + λ_b ⊙ (B_s (λ_d[:r] ⊙ (A_s[:r] x))),  A: 2r × max_in, λ_d: 2r, B: max_out × r."""

    name = "PVeRA"
    peft_types = ("PVERA",)
    prefix = "pvera"
    tokens = ("pvera_lambda_b", "pvera_lambda_d")
    shared_tokens = ("pvera_A", "pvera_B")
    rank_split = 2

    def refusal(self, config):
        if config.get("sample_at_inference"):
            return (
                "it samples its low-rank code afresh at every forward pass (sample_at_inference=True), so no fixed "
                "weight reproduces it. Adapters with sample_at_inference=False use the mean and merge."
            )
        return None


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """peft/tuners/vera/model.py `_kaiming_init`: U(±√3·√2/√fan_in), fan_in = shape[1]; same float steps."""
    std = math.sqrt(2) / math.sqrt(shape[1])
    bound = math.sqrt(3.0) * std
    return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)


def _linear_shape(family: str, base_shapes: ShapeLookup, path: str, fan_in_fan_out: bool) -> tuple[int, int]:
    shape = base_shapes.weight(path)
    if shape is None or len(shape) != 2:
        raise AdapterError(
            f"{family} module {path}: the base has no 2-D tensor {path}.weight. This adapter was saved without its "
            "projections (save_projection=False); they are regenerated from projection_prng_key and sized by the "
            "base layers, so the base must be the model the adapter was trained on."
        )
    # Conv1D (fan_in_fan_out) stores its weight as in × out.
    return (shape[1], shape[0]) if fan_in_fan_out else (shape[0], shape[1])

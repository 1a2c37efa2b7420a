"""DeLoRA: a LoRA whose rank-one terms are normalised and rescaled by a trained bound λ.

PEFT forward (peft/tuners/delora/layer.py, DeloraLinear.forward / _compute_delta):
  y = W x + b + B diag(λ / (r ‖a_i‖ ‖b_i‖)) A (w ⊙ x)
with a_i = row i of A, b_i = column i of B (both norms clamped to ≥ 1e-4), r = rows of A (PEFT's r,
rank_pattern included) and w the stored `delora_w_norm` (‖W[:, j]‖ of the base when the adapter was
created; the stored value is used, never a recomputation). PEFT supports nn.Linear only: no Conv1D case.
"""

from __future__ import annotations

import torch

from ..errors import AdapterError
from .base import AdapterFamily, ModuleState, Scheme, require, shape_error, split_keys

NORM_FLOOR = 1e-4  # torch.clamp(..., min=1e-4) in DeloraLayer._compute_delta


def _scale_lambda(state: ModuleState, c: float) -> ModuleState:
    # ΔW is linear in λ, and λ's no-op value is 0: λ(c) = c·λ gives W + c·ΔW.
    return state.with_tensors(delora_lambda=c * state.tensors["delora_lambda"])


class DeLoRA(AdapterFamily):
    name = "DeLoRA"
    peft_types = ("DELORA",)
    tokens = ("delora_A", "delora_B", "delora_lambda", "delora_w_norm")  # the last is a persistent buffer
    schemes = {
        "linear": Scheme(
            "linear",
            "λ → c·λ",
            "0: base · 1: trained · −1: W − ΔW",
            _scale_lambda,
        ),
    }

    def parse(self, config, tensors, base_shapes, options):
        modules, _, _ = split_keys(tensors, self.tokens)
        states = []
        for path, params in modules.items():
            require(params, path, *self.tokens)
            states.append(ModuleState(path, params))
        return states

    def check_shapes(self, state, weight_shape, bias_shape):
        a, b = state.tensors["delora_A"], state.tensors["delora_B"]
        expected = (b.shape[0], a.shape[1])
        if tuple(weight_shape) != expected:
            raise shape_error(state.path, "weight shape", expected, tuple(weight_shape))
        norms = state.tensors["delora_w_norm"].numel()
        if a.shape[0] != b.shape[1] or norms != a.shape[1]:
            raise AdapterError(
                f"DeLoRA module {state.path}: delora_A is {tuple(a.shape)}, delora_B {tuple(b.shape)} and "
                f"delora_w_norm has length {norms}; expected rank {a.shape[0]} on both factors and one norm per input "
                f"column ({a.shape[1]}). The adapter file is inconsistent."
            )

    def weight(self, state, weight):
        """W + ΔW, ΔW = B diag(λ / (r ‖a_i‖ ‖b_i‖)) A diag(w)  (DeloraLayer._compute_delta)."""
        return torch.addmm(weight, *_factors(state))

    def low_rank(self, state, shape):
        """ΔW = (B diag(λ / (r ‖a_i‖ ‖b_i‖))) (A diag(w)), the two factors of _delta."""
        return _factors(state)

    # ---- runtime ---------------------------------------------------------------------------------
    def live_state(self, layer, adapter, path):
        tensors = {name: getattr(layer, name)[adapter].detach().clone() for name in self.tokens}
        return ModuleState(path, tensors)

    def set_live_state(self, layer, adapter, state):
        for name in self.tokens:
            getattr(layer, name)[adapter].data.copy_(state.tensors[name])


def _factors(state: ModuleState) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = state.tensors["delora_A"], state.tensors["delora_B"]
    rank = a.shape[0]
    a_norms = torch.clamp(a.norm(dim=1), min=NORM_FLOOR)
    b_norms = torch.clamp(b.norm(dim=0), min=NORM_FLOOR)
    scale = state.tensors["delora_lambda"] / rank / (a_norms * b_norms)
    return b * scale, a * state.tensors["delora_w_norm"]

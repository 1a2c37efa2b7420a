"""UniLoRA: LoRA factors whose every entry is drawn, by a fixed index, from one trained vector θ shared by all layers.

PEFT forward (peft/tuners/unilora/layer.py, Linear._get_lora_matrices / forward):
  A = θ[indices_A] ⊙ scales_A,  B = θ[indices_B] ⊙ scales_B,  y = W x + b + B A x   (Conv1D: same orientation)
θ is saved once (base_model.unilora_theta_d); the indices and 1/√count scales per module only with
save_indices=True. ΔW is linear in scales_B (no-op 0): the linear scheme is scales_B → c·scales_B.
"""

from __future__ import annotations

from .base import LowRankChange, ModuleState, Scheme, require, scale_tensors, shape_error, split_keys
from .scaled_delta import TensorDictFamily

THETA = "unilora_theta_d"
PER_MODULE = ("unilora_indices_A", "unilora_indices_B", "unilora_scales_A", "unilora_scales_B")


class UniLoRA(LowRankChange, TensorDictFamily):
    name = "UniLoRA"
    peft_types = ("UNILORA",)
    tokens = (*PER_MODULE, THETA)
    shared_tokens = (THETA,)
    schemes = {
        "linear": Scheme(
            "linear", "scales_B → c·scales_B", "0: base · 1: trained · −1: W − BA", scale_tensors("unilora_scales_B")
        ),
    }

    def knob_names(self):
        return (THETA, "unilora_scales_A", "unilora_scales_B")

    def refusal(self, config):
        if not config.get("save_indices", False):
            return (
                "it was saved without its per-layer indices (save_indices=False): PEFT draws them at load over every "
                "adapted layer in the model's module order, which a merge from the checkpoint alone does not know. "
                "Re-save it with save_indices=True (PEFT: config.save_indices = True, then save_pretrained)."
            )
        return None

    def parse(self, config, tensors, base_shapes, options):
        modules, _, shared = split_keys(tensors, self.tokens, self.shared_tokens)
        states = []
        for path, params in modules.items():
            require(params, path, *PER_MODULE)
            require(shared, "base_model", THETA)
            params = {
                **params,
                "unilora_indices_A": params["unilora_indices_A"].long(),
                "unilora_indices_B": params["unilora_indices_B"].long(),
                THETA: shared[THETA],
            }
            states.append(ModuleState(path, params, fan_in_fan_out=bool(config.get("fan_in_fan_out", False))))
        return states

    def check_shapes(self, state, weight_shape, bias_shape):
        expected = (state.tensors["unilora_indices_B"].shape[0], state.tensors["unilora_indices_A"].shape[1])
        if tuple(weight_shape) != expected:
            raise shape_error(state.path, "weight shape", expected, tuple(weight_shape))


    def low_rank(self, state, shape):
        t = state.tensors
        theta = t[THETA]
        return theta[t["unilora_indices_B"]] * t["unilora_scales_B"], theta[t["unilora_indices_A"]] * t[
            "unilora_scales_A"
        ]

"""The shared table of cases: architecture × adapter config × schemes.

Every row is checked by tests/test_cases.py the same way: merged logits vs PEFT's live forward under
`weightsteer.scaled` at every coeff (≤ 1e-4 fp32), and c = 0 byte-identical to the base for every scheme
that promises it. A new architecture or adapter type is a row here, not a new test file; per-family files
keep only their edge cases. Configs are factories so that PEFT is imported only when a case runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

COEFFS = (-1, -0.5, 0, 0.5, 1, 2)
ATTN_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Case:
    id: str
    arch: str  # a name conftest.tiny_config knows
    config: Callable[[], object]  # () -> a PEFT config
    schemes: tuple[str | None, ...] = (None, "delta")
    coeffs: tuple[float, ...] = COEFFS
    scale: float = 0.1  # perturbation of the trained parameters
    around_one: tuple[str, ...] = ()  # parameters perturbed around 1 instead of their init
    atol: float = 1e-4
    marks: tuple = field(default_factory=tuple)


def _lora(**kwargs):
    def make():
        from peft import LoraConfig

        return LoraConfig(**kwargs)

    return make


# ---- PEFT types on the reference architectures ------------------------------------------------------
TYPE_CASES = [
    Case("lora-llama", "llama", _lora(r=4, lora_alpha=8, target_modules=ATTN_MLP), (None, "delta", "knob:scaling")),
    Case("lora-gpt2-conv1d", "gpt2", _lora(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)),
]

# ---- architectures (real-world checkpoints as transformers saves them) -------------------------------
# Module paths ≠ stored names: PEFT saves model.language_model.…, the checkpoint stores model.… or
# language_model.model.… (weightsteer.names replays transformers' conversion mapping). The table compares text-only
# logits; tests/test_names.py compares every stored tensor (vision tower, projector) with PEFT's own merge.
SHORT = (-1, 0, 0.5, 1)
VLM_CASES = [
    Case("vlm-qwen2_vl", "qwen2_vl", _lora(r=2, lora_alpha=4, target_modules=[*ATTN_MLP, "qkv", "fc1", "mlp.0"]), coeffs=SHORT),
    Case("vlm-qwen2_5_vl", "qwen2_5_vl", _lora(r=2, lora_alpha=4, target_modules=[*ATTN_MLP, "qkv", "mlp.0"]), coeffs=SHORT),
    Case("vlm-qwen3_vl", "qwen3_vl", _lora(r=2, lora_alpha=4, target_modules=[*ATTN_MLP, "qkv", "linear_fc1"]), coeffs=SHORT),
    Case(
        "vlm-gemma3",
        "gemma3",
        _lora(r=2, lora_alpha=4, target_modules=[*ATTN_MLP, "fc1", "out_proj"],
              target_parameters=["multi_modal_projector.mm_input_projection_weight"]),
        coeffs=SHORT,
    ),
    Case("vlm-llava", "llava", _lora(r=2, lora_alpha=4, target_modules=[*ATTN_MLP, "fc1", "linear_1", "linear_2", "lm_head"]), coeffs=SHORT),
    Case("vlm-mistral3", "mistral3", _lora(r=2, lora_alpha=4, target_modules=[*ATTN_MLP, "linear_1", "merging_layer"]), coeffs=SHORT),
]
# MoE experts: transformers 5 fuses them into 3-D parameters that PEFT targets with target_parameters (ParamWrapper);
# the checkpoint stores one tensor per expert. PEFT 0.21 rewrites Mixtral's ["w1", "w2", "w3", "gate"] and Qwen3-MoE's
# "all-linear" into target_parameters itself.
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
MOE_CASES = [
    Case("moe-mixtral-w123", "mixtral", _lora(r=2, lora_alpha=4, target_modules=["q_proj", "w1", "w2", "w3", "gate"]), coeffs=SHORT),
    Case("moe-qwen3_moe-all-linear", "qwen3_moe", _lora(r=2, lora_alpha=4, target_modules="all-linear"), coeffs=SHORT),
    Case("moe-qwen3_moe-router", "qwen3_moe", _lora(r=2, lora_alpha=4, target_modules=[], target_parameters=["mlp.gate.weight"]), coeffs=SHORT),
    Case(
        "moe-qwen2_moe-shared",
        "qwen2_moe",
        _lora(r=2, lora_alpha=4, target_modules=["q_proj", "shared_expert.gate_proj", "shared_expert.down_proj", "shared_expert_gate"],
              target_parameters=[*EXPERTS, "mlp.gate.weight"]),
        coeffs=SHORT,
    ),
    Case(
        "moe-gpt_oss",
        "gpt_oss",
        # three ParamWrappers nested on one experts module, one of them on a 2-D bias; gate_up_proj is stored fused
        # and interleaved as the model holds it, (experts, in, out) (`is_transposed`)
        _lora(r=2, lora_alpha=4, target_modules=["q_proj"], use_rslora=True,
              target_parameters=[*EXPERTS, "mlp.experts.gate_up_proj_bias", "mlp.router.weight"]),
        coeffs=SHORT,
    ),
    Case("moe-deepseek_v3", "deepseek_v3", _lora(r=2, lora_alpha=4, target_modules=["q_b_proj", "kv_b_proj"], target_parameters=EXPERTS), coeffs=SHORT),
]
MODEL_CASES: list[Case] = [*VLM_CASES, *MOE_CASES]

CASES = [*TYPE_CASES, *MODEL_CASES]

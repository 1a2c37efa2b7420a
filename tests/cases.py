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


def _peft(config_class: str, **kwargs):
    def make():
        import peft

        return getattr(peft, config_class)(**kwargs)

    return make


GPT2 = ["c_attn", "c_proj", "c_fc"]
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]

# ---- PEFT types on the reference architectures ------------------------------------------------------
TYPE_CASES = [
    Case("lora-llama", "llama", _lora(r=4, lora_alpha=8, target_modules=ATTN_MLP), (None, "delta", "knob:scaling")),
    Case("lora-gpt2-conv1d", "gpt2", _lora(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)),
    # PEFT 0.21 types (issue 13): one adapter per row, shared by its schemes.
    Case("hira-llama", "llama", _peft("HiraConfig", r=4, target_modules=[*ATTN_MLP, "embed_tokens"]), scale=0.3),
    Case("hira-gpt2-conv1d", "gpt2", _peft("HiraConfig", r=4, target_modules=GPT2, fan_in_fan_out=True), (None,), scale=1.0),
    Case("beft-qwen2-bias", "qwen2", _peft("BeftConfig", target_modules=["q_proj", "k_proj", "v_proj"])),
    Case("glora-llama", "llama", _peft("GloraConfig", r=4, target_modules=ATTN_MLP)),
    Case("glora-vector-llama", "llama", _peft("GloraConfig", config_A_B="vector", target_modules=ATTN), (None,)),
    Case("glora-qwen2-bias", "qwen2", _peft("GloraConfig", r=4, config_C="none", config_D_E="vector", target_modules=["q_proj", "v_proj"]), (None,)),
    Case("gralora-llama", "llama", _peft("GraloraConfig", r=4, gralora_k=2, hybrid_r=2, alpha=8, target_modules=ATTN_MLP)),
    Case("gralora-gpt2-conv1d", "gpt2", _peft("GraloraConfig", r=4, gralora_k=2, alpha=8, target_modules=GPT2, fan_in_fan_out=True), (None,)),
    Case("peanut-llama", "llama", _peft("PeanutConfig", r=4, depth=2, scaling=2.0, target_modules=ATTN_MLP)),
    Case("pvera-llama", "llama", _peft("PveraConfig", r=4, target_modules=ATTN_MLP)),
    Case("pvera-gpt2-conv1d", "gpt2", _peft("PveraConfig", r=4, target_modules=GPT2, fan_in_fan_out=True, save_projection=False), (None,), scale=0.5),
    Case("supertuning-llama", "llama", _peft("SupertuningConfig", sparsity=0.95, r=2, target_modules=ATTN_MLP)),
    Case("supertuning-recomputed-positions", "llama", _peft("SupertuningConfig", sparsity=0.9, save_precomputed_indices=False, target_modules=ATTN), (None,)),
    Case("waveft-llama", "llama", _peft("WaveFTConfig", n_frequency=200, wavelet_family="db2", target_modules=ATTN_MLP)),
    Case("waveft-no-idwt-gpt2-conv1d", "gpt2", _peft("WaveFTConfig", n_frequency=200, use_idwt=False, target_modules=GPT2, fan_in_fan_out=True), (None,)),
    Case("deft-llama", "llama", _peft("DeftConfig", r=4, alpha=8, target_modules=ATTN_MLP)),
    Case("deft-qr-gpt2-conv1d", "gpt2", _peft("DeftConfig", r=4, decomposition_method="qr", target_modules=GPT2, fan_in_fan_out=True), (None,)),
    Case("para-llama", "llama", _peft("DeftConfig", r=4, para=True, target_modules=ATTN), (None,), scale=0.3),
    Case("frod-llama", "llama", _peft("FrodConfig", target_modules=ATTN_MLP), scale=0.15),
    Case("frod-gpt2-conv1d", "gpt2", _peft("FrodConfig", target_modules=GPT2, fan_in_fan_out=True), (None,), scale=0.15),
    Case("unilora-llama", "llama", _peft("UniLoraConfig", r=4, theta_d_length=512, save_indices=True, target_modules=ATTN_MLP), scale=0.3),
    Case("unilora-gpt2-conv1d", "gpt2", _peft("UniLoraConfig", r=4, theta_d_length=512, save_indices=True, target_modules=GPT2, fan_in_fan_out=True), (None,), scale=0.3),
    Case("tinylora-llama", "llama", _peft("TinyLoraConfig", r=4, u=8, weight_tying=0.5, target_modules=[*ATTN, "embed_tokens"]), scale=0.15),
    Case("tinylora-gpt2-conv1d", "gpt2", _peft("TinyLoraConfig", r=4, u=8, target_modules=GPT2, fan_in_fan_out=True), (None,), scale=0.5),
    Case("osf-llama", "llama", _peft("OSFConfig", effective_rank=48, target_modules=ATTN), scale=0.05),
    Case("adamss-llama", "llama", _peft("AdamssConfig", r=16, num_subspaces=3, subspace_rank=2, target_modules=ATTN_MLP)),
    Case("adamss-qwen2-bias", "qwen2", _peft("AdamssConfig", r=16, num_subspaces=4, random_seed=3, target_modules=[*ATTN, "up_proj"])),
    # LoRA variants PEFT merges (issue 13)
    Case("dora-embedding-llama", "llama", _lora(r=4, lora_alpha=8, use_dora=True, target_modules=["embed_tokens", "q_proj"])),
    Case("velora-llama", "llama", _lora(r=4, target_modules=ATTN, velora_config={"num_groups": 4}), (None,)),
    Case("monteclora-llama", "llama", _lora(r=4, target_modules=ATTN, monteclora_config={}), (None,)),
    Case("bdlora-a-and-b-llama", "llama", _lora(r=4, target_modules=ATTN_MLP, use_bdlora={"target_modules_bd_a": ["o_proj", "down_proj"], "target_modules_bd_b": ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"], "nblocks": 2})),
    Case("bdlora-b-only-llama", "llama", _lora(r=4, target_modules=["q_proj", "v_proj"], use_bdlora={"target_modules_bd_b": ["q_proj", "v_proj"], "nblocks": 2}), (None,)),
    Case("kasa-llama", "llama", _lora(r=4, target_modules=ATTN, kasa_config={}), ("knob:scaling",)),
    Case("lora-target-parameters-gpt2-conv1d", "gpt2", _lora(r=4, target_modules=[], target_parameters=["attn.c_attn.weight", "mlp.c_fc.weight"]), (None,)),
    Case("ln-tuning-gpt2-conv1d", "gpt2", _peft("LNTuningConfig", target_modules=["ln_1", "c_attn"]), (None,)),
    Case("psoft-llama", "llama", _peft("PsoftConfig", r=4, psoft_alpha=8, target_modules=ATTN_MLP), around_one=("vector_",), scale=0.3),
    Case("psoft-lowrank-pissa-neumann-llama", "llama", _peft("PsoftConfig", r=4, psoft_svd="lowrank", ab_svd_init="pissa_init", use_cayley_neumann=True, target_modules=ATTN), (None,), around_one=("vector_",), scale=0.3),
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

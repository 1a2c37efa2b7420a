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

def _tokens(**kwargs):
    def make():
        from peft import TrainableTokensConfig

        return TrainableTokensConfig(**kwargs)

    return make


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
# Embeddings, heads and tying per architecture, from PEFT's own test matrix (tied and untied heads, token rows on
# the embedding and the head, ensure_weight_tying), and model classes other than causal LMs.
MODEL_QUICK = dict(schemes=(None,), coeffs=(-1, 0, 0.5, 1))
NEOX = ["query_key_value"]
HEAD_CASES = [
    # GPT-NeoX stores its head as embed_out (transformers names the module lm_head).
    Case("neox-head-modules-to-save", "gpt_neox", _lora(r=2, target_modules=NEOX, modules_to_save=["lm_head"]), **MODEL_QUICK),
    Case("neox-head-lora", "gpt_neox", _lora(r=2, target_modules=[*NEOX, "lm_head"]), **MODEL_QUICK),
    Case("neox-tokens-embed-and-head", "gpt_neox", _lora(r=2, target_modules=NEOX, trainable_token_indices={"embed_in": [1, 5, 9], "lm_head": [3, 42]}), **MODEL_QUICK),
    Case("neox-tied-tokens-on-head", "gpt_neox_tied", _tokens(target_modules=["lm_head"], token_indices=[1, 5, 9]), **MODEL_QUICK),
    # ensure_weight_tying ties only modules named embed_tokens / lm_head: GPT-2's wte and Falcon's word_embeddings untie.
    Case("gpt2-wte-modules-to-save-tying", "gpt2", _lora(r=2, target_modules=["c_attn"], modules_to_save=["wte"], ensure_weight_tying=True), **MODEL_QUICK),
    Case("falcon-embedding-lora-tying", "falcon", _lora(r=2, target_modules=[*NEOX, "word_embeddings"], ensure_weight_tying=True), **MODEL_QUICK),
    # PEFT moves modules_to_save=["lm_head"] to `transformer.wte` and saves both copies, but on loading it ties
    # nothing (wte is not a name it knows) and loads the head's copy into the shared base weight: its live model
    # then has no base left to scale from (it runs the trained copy at every c), so only c = 1 has an oracle.
    Case("gpt2-head-modules-to-save-tying", "gpt2", _lora(r=2, target_modules=["c_attn"], modules_to_save=["lm_head"], ensure_weight_tying=True), schemes=(None,), coeffs=(1,)),
    Case("gpt2-head-lora-tying", "gpt2", _lora(r=2, target_modules=["c_attn", "lm_head"], ensure_weight_tying=True), **MODEL_QUICK),
    Case("opt-tokens-same-rows", "opt", _lora(r=2, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [1, 5, 9], "lm_head": [1, 5, 9]}), **MODEL_QUICK),
    # One shared modules_to_save copy behind the embedding and the head: scaled interpolates it once.
    Case("llama-tied-embedding-modules-to-save-tying", "llama_tied", _lora(r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"], ensure_weight_tying=True), **MODEL_QUICK),
    # A tied VLM (Gemma 3 loads as Gemma3ForConditionalGeneration) with a LoRA on the head: untied where each version reads it.
    Case("gemma3-vlm-head-lora", "gemma3", _lora(r=2, target_modules=["lm_head", "q_proj"]), **MODEL_QUICK),
    # Encoder-decoders: T5's head and embed_tokens are tied to `shared`; BART's head to model.shared.
    Case("t5-head-and-embed-tokens-lora", "t5", _lora(r=2, target_modules=["q", "v", "lm_head", "embed_tokens"]), **MODEL_QUICK),
    Case("bart-head-lora", "bart", _lora(r=2, target_modules=["q_proj", "lm_head"]), **MODEL_QUICK),
    # Other model classes: a sequence classifier (its head stored whole) and a masked LM with a tied decoder.
    Case("bert-classifier", "bert_cls", _lora(r=2, target_modules=["query", "value"], modules_to_save=["classifier"]), **MODEL_QUICK),
    Case("modernbert-masked-lm", "modernbert", _lora(r=2, target_modules=["Wqkv", "Wo"]), **MODEL_QUICK),
]
MODEL_CASES: list[Case] = [*VLM_CASES, *MOE_CASES, *HEAD_CASES]

CASES = [*TYPE_CASES, *MODEL_CASES]

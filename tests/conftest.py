"""Tiny models built from configs, real PEFT adapters perturbed away from their init, the logits of a merged
checkpoint and of PEFT's runtime under `scaled` (tests/test_cases.py compares them for every row of tests/cases.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import weightsteer

TOKENS = torch.tensor([[1, 5, 9, 17, 33, 65, 100, 127, 3, 42, 77]])
ATOL = 1e-4


def tiny_config(arch: str):
    import transformers as tf

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    if arch == "llama":
        return tf.LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=False)
    if arch == "llama_tied":
        return tf.LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=True)
    if arch == "qwen2":
        return tf.Qwen2Config(**common, num_key_value_heads=2, tie_word_embeddings=False)
    if arch == "gemma":
        return tf.GemmaConfig(**common, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    if arch in TINY_MULTIMODAL or arch in TINY_MOE:
        return (TINY_MULTIMODAL | TINY_MOE)[arch](tf)
    return _tiny_model_config(arch, common)


# Smaller still (hidden 32, one vision layer): the architecture × adapter table has many of these.
_TEXT = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
_MROPE = {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0}
_QWEN_VL_TOKENS = dict(image_token_id=120, video_token_id=121, vision_start_token_id=122)
TINY_MULTIMODAL = {
    "qwen2_vl": lambda tf: tf.Qwen2VLConfig(
        text_config=dict(**_TEXT, rope_parameters=_MROPE),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=2, spatial_merge_size=1, temporal_patch_size=1),
        **_QWEN_VL_TOKENS,
    ),
    "qwen2_5_vl": lambda tf: tf.Qwen2_5_VLConfig(
        text_config=dict(**_TEXT, rope_parameters=_MROPE),
        vision_config=dict(depth=1, hidden_size=16, out_hidden_size=32, intermediate_size=32, num_heads=2, patch_size=2,
                           spatial_merge_size=1, temporal_patch_size=1, window_size=4, fullatt_block_indexes=[0]),
        **_QWEN_VL_TOKENS,
    ),
    "qwen3_vl": lambda tf: tf.Qwen3VLConfig(
        text_config=dict(**_TEXT, head_dim=8, rope_parameters={**_MROPE, "mrope_interleaved": True}),
        vision_config=dict(depth=1, hidden_size=16, out_hidden_size=32, intermediate_size=32, num_heads=2, patch_size=2,
                           spatial_merge_size=1, temporal_patch_size=1, num_position_embeddings=16, deepstack_visual_indexes=[0]),
        **_QWEN_VL_TOKENS,
    ),
    "gemma3": lambda tf: tf.Gemma3Config(
        text_config=dict(**_TEXT, head_dim=8, sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=2),
        mm_tokens_per_image=4, image_token_index=120, boi_token_index=121, eoi_token_index=122,
    ),
    "llava": lambda tf: tf.LlavaConfig(
        text_config=tf.LlamaConfig(**_TEXT),
        vision_config=tf.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=2),
        image_token_index=120,
    ),
    "mistral3": lambda tf: tf.Mistral3Config(
        text_config=dict(model_type="mistral", **_TEXT, head_dim=8),
        vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=8, patch_size=2, head_dim=8),
        image_token_index=120, spatial_merge_size=1,
    ),
}
_EXPERTS = dict(num_experts_per_tok=2)
TINY_MOE = {
    "mixtral": lambda tf: tf.MixtralConfig(**_TEXT, num_local_experts=4, **_EXPERTS),
    "qwen2_moe": lambda tf: tf.Qwen2MoeConfig(**_TEXT, num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=32, **_EXPERTS),
    "qwen3_moe": lambda tf: tf.Qwen3MoeConfig(**_TEXT, num_experts=4, moe_intermediate_size=32, head_dim=8, **_EXPERTS),
    "gpt_oss": lambda tf: tf.GptOssConfig(**_TEXT, num_local_experts=4, head_dim=8, layer_types=["full_attention"] * 2, **_EXPERTS),
    "deepseek_v3": lambda tf: tf.DeepseekV3Config(
        **{**_TEXT, "num_key_value_heads": 4}, n_routed_experts=4, n_shared_experts=1, moe_intermediate_size=32, first_k_dense_replace=1,
        n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, **_EXPERTS,
    ),
}


def _tiny_model_config(arch: str, common: dict):
    """Architectures whose embeddings, heads or model class differ (tests/test_models.py, MODEL_CASES)."""
    import transformers as tf

    small = dict(vocab_size=128, num_attention_heads=4)
    if arch in ("gpt_neox", "gpt_neox_tied"):  # head stored as embed_out
        return tf.GPTNeoXConfig(**common, tie_word_embeddings=arch == "gpt_neox_tied")
    if arch == "falcon":  # tied: transformer.word_embeddings
        return tf.FalconConfig(**small, hidden_size=64, num_hidden_layers=2)
    if arch == "opt":  # tied: model.decoder.embed_tokens
        return tf.OPTConfig(**small, hidden_size=64, ffn_dim=128, num_hidden_layers=2, word_embed_proj_dim=64)
    if arch == "t5":  # shared, tied to encoder/decoder embed_tokens and lm_head
        return tf.T5Config(vocab_size=128, d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16, decoder_start_token_id=0)
    if arch == "bart":
        return tf.BartConfig(
            vocab_size=128, d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
            encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64,
        )
    if arch == "bert_cls":
        return tf.BertConfig(**common, max_position_embeddings=64, architectures=["BertForSequenceClassification"])
    if arch == "modernbert":
        ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
        return tf.ModernBertConfig(**common, **ids, max_position_embeddings=64, architectures=["ModernBertForMaskedLM"])
    raise ValueError(arch)


SEQ2SEQ = ("t5", "bart")


def auto_class(config):
    """The transformers class for a config: its `architectures` entry, seq2seq for T5/BART, else a causal LM."""
    import transformers as tf

    names = getattr(config, "architectures", None) or []
    if names and hasattr(tf, names[0]):
        return getattr(tf, names[0])
    if hasattr(config, "vision_config"):
        return tf.AutoModelForImageTextToText
    return tf.AutoModelForSeq2SeqLM if config.model_type in SEQ2SEQ else tf.AutoModelForCausalLM


def build_base(arch: str, folder: Path, *, shard_size: str | None = None, dtype=torch.float32, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    config = tiny_config(arch)
    cls = auto_class(config)
    model = (cls.from_config if hasattr(cls, "from_config") else cls._from_config)(config).to(dtype)
    with torch.no_grad():  # random biases, so bias handling is tested for real
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.1)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(folder, **kwargs)
    (folder / "tokenizer.json").write_text('{"version": "1.0", "note": "copied byte for byte"}\n')
    (folder / "LICENSE").write_text("Apache-2.0\n")
    return folder


@pytest.fixture(scope="session")
def bases(tmp_path_factory):
    """Lazily built base checkpoints, one per architecture, shared by the whole session."""
    cache: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("bases")

    def get(arch: str) -> Path:
        if arch not in cache:
            cache[arch] = build_base(arch.split(":")[0], root / arch.replace(":", "_"), **_variant(arch))
        return cache[arch]

    return get


def _variant(arch: str) -> dict:
    options = {"sharded": {"shard_size": "60KB"}, "bf16": {"dtype": torch.bfloat16}}
    return options[arch.split(":")[1]] if ":" in arch else {}


def load_base(path: Path):
    """The class config.json names (a VLM loads as its ...ForConditionalGeneration)."""
    import transformers

    architecture = json.loads((Path(path) / "config.json").read_text())["architectures"][0]
    return getattr(transformers, architecture).from_pretrained(path, dtype=torch.float32)


def perturb(model, scale: float = 0.1, seed: int = 1, around_one: tuple[str, ...] = ()) -> None:
    """Move every trainable adapter parameter away from its (often identity) init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and p.is_floating_point():
                noise = torch.randn(p.shape, generator=generator) * scale
                if any(token in name for token in around_one):
                    p.copy_(1 + noise)
                else:
                    p.add_(noise)


def make_adapter(base: Path, folder: Path, config, *, scale: float = 0.1, around_one: tuple[str, ...] = (), seed: int = 1) -> Path:
    from peft import get_peft_model

    torch.manual_seed(seed)  # PEFT's init draws from the global generator: the same adapter whatever ran before
    model = get_peft_model(load_base(base), config)
    perturb(model, scale, seed, around_one)
    model.save_pretrained(folder)
    # Record where the base is, as PEFT does with a Hub id.
    config_path = folder / "adapter_config.json"
    data = json.loads(config_path.read_text())
    data["base_model_name_or_path"] = str(base)
    config_path.write_text(json.dumps(data, indent=2))
    return folder


def runtime_logits(base: Path, adapter: Path, coeff: float, scheme: str | None = None, *, task_id: int | None = None) -> torch.Tensor:
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base(base), adapter).eval()
    with torch.no_grad(), weightsteer.scaled(model, coeff, scheme=scheme):
        return forward_logits(model, task_id)


def forward_logits(model, task_id: int | None = None) -> torch.Tensor:
    """Logits on TOKENS (seq2seq models: decoding TOKENS' first tokens as well; Poly: for task `task_id`)."""
    extra = {"decoder_input_ids": TOKENS[:, :6]} if model.config.is_encoder_decoder else {}
    if task_id is not None:  # PEFT's task-typed PeftModel passes task_ids on to the Poly layers
        extra["task_ids"] = torch.tensor([task_id])
    return model(input_ids=TOKENS, **extra).logits


def model_logits(path: Path) -> torch.Tensor:
    with torch.no_grad():
        return forward_logits(load_base(path).eval())


def assert_matches_runtime(base: Path, adapter: Path, out_root: Path, coeffs, scheme: str | None = None, atol: float = ATOL) -> dict:
    """Merge at every coeff and compare logits with PEFT's runtime under `scaled`. Returns the max errors.

    For tests that change the engine around a merge; an adapter case is a row of tests/cases.py instead."""
    errors = {}
    base_logits = model_logits(base)
    for c in coeffs:
        out = out_root / f"c{c:g}"
        weightsteer.merge(adapter, out, coeff=c, scheme=scheme, overwrite=True)
        merged = model_logits(out)
        expected = runtime_logits(base, adapter, c, scheme)
        errors[c] = (merged - expected).abs().max().item()
        assert errors[c] <= atol, f"coeff {c}: merged vs runtime max |Δlogit| = {errors[c]:.3g}"
        if c != 0:
            assert (expected - base_logits).abs().max() > 10 * atol, f"coeff {c}: adapter has no effect, test is vacuous"
        shutil.rmtree(out)
    return errors


def assert_base_identical(base: Path, out: Path) -> None:
    """Every tensor of out equals the base's bit for bit (and none is missing), in the base's weight files,
    with the base's config.json byte for byte (no untied head, no patched flag)."""
    assert sorted(f.name for f in out.glob("*.safetensors*")) == sorted(f.name for f in base.glob("*.safetensors*"))
    assert (out / "config.json").read_bytes() == (base / "config.json").read_bytes()
    ours = {}
    for f in sorted(out.glob("*.safetensors")):
        ours.update(load_file(f))
    theirs = {}
    for f in sorted(base.glob("*.safetensors")):
        theirs.update(load_file(f))
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert torch.equal(ours[name].view(torch.uint8), tensor.view(torch.uint8)), name

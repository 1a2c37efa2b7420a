"""Tiny models built from configs, real PEFT adapters perturbed away from their init, and the
merged-vs-runtime comparison every adapter test uses."""

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
    raise ValueError(arch)


def build_base(arch: str, folder: Path, *, shard_size: str | None = None, dtype=torch.float32, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch)).to(dtype)
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
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


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

    model = get_peft_model(load_base(base), config)
    perturb(model, scale, seed, around_one)
    model.save_pretrained(folder)
    # Record where the base is, as PEFT does with a Hub id.
    config_path = folder / "adapter_config.json"
    data = json.loads(config_path.read_text())
    data["base_model_name_or_path"] = str(base)
    config_path.write_text(json.dumps(data, indent=2))
    return folder


def runtime_logits(base: Path, adapter: Path, coeff: float, scheme: str | None = None) -> torch.Tensor:
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base(base), adapter).eval()
    with torch.no_grad(), weightsteer.scaled(model, coeff, scheme=scheme):
        return model(TOKENS).logits


def model_logits(path: Path) -> torch.Tensor:
    with torch.no_grad():
        return load_base(path).eval()(TOKENS).logits


def assert_matches_runtime(base: Path, adapter: Path, out_root: Path, coeffs, scheme: str | None = None, atol: float = ATOL) -> dict:
    """Merge at every coeff and compare logits with PEFT's runtime under `scaled`. Returns the max errors."""
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
    """Every tensor of out equals the base's bit for bit (and none is missing)."""
    ours = {}
    for f in sorted(out.glob("*.safetensors")):
        ours.update(load_file(f))
    theirs = {}
    for f in sorted(base.glob("*.safetensors")):
        theirs.update(load_file(f))
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert torch.equal(ours[name].view(torch.uint8), tensor.view(torch.uint8)), name

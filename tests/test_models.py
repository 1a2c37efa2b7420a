"""Edge cases of real checkpoints: which weight files, stale copies, added tokens, tied layouts at c = 0, refusals.

The runtime-match cases per architecture are rows of tests/cases.py (MODEL_CASES).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import weightsteer
from conftest import TOKENS, assert_base_identical, load_base, make_adapter, model_logits, perturb

ADDED = 8  # tokens added to the 128-token vocabulary


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name not in ("README.md", "weightsteer.json", ".weightsteer-local.json"))


def test_coeff_zero_keeps_the_tied_layout(bases, tmp_path):
    """A LoRA on a tied embedding unties the head at c ≠ 0, but c = 0 is the base: same files, same bytes."""
    base = bases("llama_tied")
    adapter = make_adapter(base, tmp_path / "a", LoraConfig(r=2, target_modules=["embed_tokens"]))
    zero, one = (r.path for r in weightsteer.merge_many(adapter, {0: tmp_path / "zero", 1: tmp_path / "one"}))
    assert "lm_head.weight" in load_file(one / "model.safetensors")
    assert _files(zero) == _files(base)
    for name in _files(base):
        assert (zero / name).read_bytes() == (base / name).read_bytes(), name
    assert weightsteer.verify(zero).ok and weightsteer.verify(one).ok


def test_gpt_neox_head_is_embed_out(bases, tmp_path):
    base = bases("gpt_neox")
    config = LoraConfig(r=2, target_modules=["query_key_value"], modules_to_save=["lm_head"])
    out = weightsteer.merge(make_adapter(base, tmp_path / "a", config), tmp_path / "m")
    merged, original = load_file(out / "model.safetensors"), load_file(base / "model.safetensors")
    assert merged.keys() == original.keys()  # no new lm_head.weight, no copy of embed_in
    assert not torch.equal(merged["embed_out.weight"], original["embed_out.weight"])
    assert torch.equal(merged["gpt_neox.embed_in.weight"], original["gpt_neox.embed_in.weight"])


def test_leftover_single_file_beside_an_index_is_what_transformers_loads(bases, tmp_path):
    """transformers prefers model.safetensors over an index; the merge reads and writes that one set only."""
    base = tmp_path / "base"
    shutil.copytree(bases("llama:sharded"), base)
    leftover = {k: v + 1 for k, v in load_base(bases("llama")).state_dict().items()}  # another model's weights
    save_file({k: v.contiguous() for k, v in leftover.items() if k != "lm_head.weight"} | {"lm_head.weight": leftover["lm_head.weight"]}, base / "model.safetensors")
    adapter = make_adapter(base, tmp_path / "a", LoraConfig(r=2, target_modules=["q_proj"]))
    out = weightsteer.merge(adapter, tmp_path / "m")
    assert _files(out) == sorted(["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "LICENSE"])
    model = PeftModel.from_pretrained(load_base(base), adapter).eval()
    with torch.no_grad():
        assert (model_logits(out) - model(TOKENS).logits).abs().max() < 1e-4


STALE = [
    "onnx/model.onnx",
    "adapter_config.json",
    "consolidated.safetensors",
    "original/consolidated.00.pth",
    "pytorch_model.bin",
    "model.pt",
    "model-q8_0.gguf",
    "flax_model.msgpack",
    "tf_model.h5",
    "openvino/openvino_model.xml",
    "openvino/openvino_model.bin",
    "coreml/model.mlpackage/Data/weights.bin",
]


def test_weight_files_the_merge_did_not_rewrite_are_dropped_and_named(bases, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(bases("llama"), base)
    adapter = make_adapter(base, tmp_path / "a", LoraConfig(r=2, target_modules=["q_proj"]))
    for name in STALE:
        (base / name).parent.mkdir(parents=True, exist_ok=True)
        (base / name).write_bytes(b"stale weights")
    result = weightsteer.merge_many(adapter, {0.5: tmp_path / "m"})[0]
    assert sorted(result.dropped_files) == sorted(STALE)
    assert _files(result.path) == sorted(["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "LICENSE"])
    card = (result.path / "README.md").read_text()
    assert "not copied from the base" in card and "`consolidated.safetensors`" in card
    assert json.loads((result.path / "weightsteer.json").read_text())["result"]["dropped_files"] == result.dropped_files


@pytest.fixture(scope="module")
def added_tokens(bases, tmp_path_factory):
    """An Unsloth-style fine-tune that added tokens: resized vocabulary, embed_tokens and lm_head saved whole.
    Returns (un-resized base, resized base, adapter)."""
    root = tmp_path_factory.mktemp("added")
    base = bases("llama")
    model = load_base(base)
    model.resize_token_embeddings(128 + ADDED)
    model.save_pretrained(root / "resized")
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"]))
    perturb(peft_model)
    peft_model.save_pretrained(root / "adapter")  # base_model_name_or_path: the un-resized base, as users train it
    (root / "adapter" / "tokenizer.json").write_text('{"note": "the tokenizer with the added tokens"}\n')
    saved = load_file(root / "adapter" / "adapter_model.safetensors")
    assert "base_model.model.lm_head.original_module.weight" in saved and "base_model.model.lm_head.modules_to_save.weight" in saved
    return base, root / "resized", root / "adapter"


def _resized_runtime(resized, adapter, coeff):
    """PEFT's forward on the resized model (the adapter's original_module holds the rows the base lacks)."""
    model = PeftModel.from_pretrained(load_base(resized), adapter).eval()
    with torch.no_grad(), weightsteer.scaled(model, coeff):
        return model(torch.cat([TOKENS, torch.tensor([[128, 135]])], dim=1)).logits


@pytest.mark.parametrize("into", ["original", "resized"])
def test_added_tokens_merge(added_tokens, tmp_path, into):
    base, resized, adapter = added_tokens
    target = base if into == "original" else resized
    for c in (-1, 0.5, 1):
        out = weightsteer.merge(adapter, tmp_path / f"m{c}", coeff=c, base=target)
        config = json.loads((out / "config.json").read_text())
        assert config["vocab_size"] == 128 + ADDED
        if into == "original":  # the grown vocabulary comes with the adapter's tokenizer
            assert (out / "tokenizer.json").read_bytes() == (adapter / "tokenizer.json").read_bytes()
        with torch.no_grad():
            merged = load_base(out).eval()(torch.cat([TOKENS, torch.tensor([[128, 135]])], dim=1)).logits
        assert (merged - _resized_runtime(resized, adapter, c)).abs().max() < 1e-4, c


def test_added_tokens_at_coeff_zero_is_the_original_base(added_tokens, tmp_path):
    base, _, adapter = added_tokens
    out = weightsteer.merge(adapter, tmp_path / "zero", coeff=0, base=base)
    assert_base_identical(base, out)
    assert (out / "config.json").read_bytes() == (base / "config.json").read_bytes()


def test_added_rows_without_a_saved_original_hold_the_trained_rows(added_tokens, tmp_path):
    """Saved without the wrapper's original_module, the added rows have no base value: trained at every c ≠ 0."""
    base, _, adapter = added_tokens
    stripped = tmp_path / "adapter"
    shutil.copytree(adapter, stripped)
    saved = load_file(adapter / "adapter_model.safetensors")
    save_file({k: v for k, v in saved.items() if ".original_module." not in k and ".modules_to_save." not in k}, stripped / "adapter_model.safetensors")
    out = weightsteer.merge(stripped, tmp_path / "half", coeff=0.5, base=base)
    merged, trained, original = load_file(out / "model.safetensors"), saved["base_model.model.lm_head.weight"], load_file(base / "model.safetensors")
    assert torch.equal(merged["lm_head.weight"][128:], trained[128:])
    expected = original["lm_head.weight"] + 0.5 * (trained[:128] - original["lm_head.weight"])
    assert torch.allclose(merged["lm_head.weight"][:128], expected)


def test_tied_multimodal_config_unties_where_each_transformers_reads_it(bases, tmp_path):
    """Gemma 3 keeps the flag at the top and in text_config (transformers 4.x reads it there): both get false."""
    base = bases("gemma3")
    assert json.loads((base / "config.json").read_text())["text_config"]["tie_word_embeddings"] is True
    adapter = make_adapter(base, tmp_path / "a", LoraConfig(r=2, target_modules=["lm_head"]))
    merged = json.loads((weightsteer.merge(adapter, tmp_path / "m") / "config.json").read_text())
    assert merged["tie_word_embeddings"] is False and merged["text_config"]["tie_word_embeddings"] is False


def test_t5_lora_on_shared_is_refused(bases, tmp_path):
    """T5 looks tokens up through encoder/decoder.embed_tokens; PEFT's forward never calls a wrapped `shared`."""
    adapter = make_adapter(bases("t5"), tmp_path / "a", LoraConfig(r=2, target_modules=["shared", "q"]))
    with pytest.raises(weightsteer.AdapterError, match="never calls: its forward looks tokens up through encoder.embed_tokens"):
        weightsteer.merge(adapter, tmp_path / "m")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    ("arch", "config"),
    [
        ("bert_cls", LoraConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"])),
        ("modernbert", LoraConfig(r=2, target_modules=["Wqkv"])),
        ("t5", LoraConfig(r=2, target_modules=["q", "lm_head"])),
        ("gemma3", LoraConfig(r=2, target_modules=["lm_head", "q_proj"])),
    ],
)
def test_verify_logits_loads_the_model_class_of_the_checkpoint(bases, tmp_path, arch, config):
    adapter = make_adapter(bases(arch), tmp_path / "a", config)
    out = weightsteer.merge(adapter, tmp_path / "m", coeff=0.5)
    report = weightsteer.verify(out, logits=True, prompts=[[1, 5, 9, 17]])
    assert report.ok, report.failures
    assert report.logits.max_abs < 1e-4


def test_added_tokens_need_every_embedding_resized(added_tokens, tmp_path):
    base, _, adapter = added_tokens
    partial = tmp_path / "adapter"
    shutil.copytree(adapter, partial)
    saved = load_file(adapter / "adapter_model.safetensors")
    save_file({k: v for k, v in saved.items() if "lm_head" not in k}, partial / "adapter_model.safetensors")
    with pytest.raises(weightsteer.AdapterError, match="but not lm_head.weight, which keeps the base's 128"):
        weightsteer.merge(partial, tmp_path / "m", base=base)
    assert not (tmp_path / "m").exists()


def test_a_checkpoint_storing_both_tied_sides_is_marked_untied(bases, tmp_path):
    """Some Hub checkpoints store the tied head too (equal, so transformers ties them): changing one side unties."""
    base = tmp_path / "base"
    shutil.copytree(bases("llama_tied"), base)
    tensors = load_file(base / "model.safetensors")
    save_file({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"].clone()}, base / "model.safetensors")
    adapter = make_adapter(base, tmp_path / "a", LoraConfig(r=2, target_modules=["embed_tokens"]))
    out = weightsteer.merge(adapter, tmp_path / "m")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    model = PeftModel.from_pretrained(load_base(base), adapter).eval()
    with torch.no_grad():
        assert (model_logits(out) - model(TOKENS).logits).abs().max() < 1e-4

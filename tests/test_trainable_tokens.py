"""TrainableTokens edge cases, alone and beside a LoRA (trainable_token_indices): a tied checkpoint stays tied
unless the head has rows of its own, the runtime restores the rows exactly, rows not matching the config are
refused. The runtime-match rows (untied and tied, every scheme) are in tests/cases.py."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, TrainableTokensConfig
from safetensors.torch import load_file

import weightsteer
from cases import ROWS, TOKEN_IDS
from conftest import TOKENS, assert_base_identical, load_base, make_adapter


def test_tied_stays_tied(bases, tmp_path):
    base = bases("llama_tied")
    adapter = make_adapter(base, tmp_path / "a", TrainableTokensConfig(token_indices=TOKEN_IDS))
    out = weightsteer.merge(adapter, tmp_path / "m", coeff=2)
    assert (out / "config.json").read_bytes() == (base / "config.json").read_bytes()
    merged, original = load_file(out / "model.safetensors"), load_file(base / "model.safetensors")
    assert merged.keys() == original.keys() and "lm_head.weight" not in merged
    changed = (merged["model.embed_tokens.weight"] != original["model.embed_tokens.weight"]).any(dim=1)
    assert changed.nonzero().flatten().tolist() == TOKEN_IDS


def test_lora_token_rows_tied_stays_tied(bases, tmp_path):
    base = bases("llama_tied")
    config = LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": TOKEN_IDS})
    adapter = make_adapter(base, tmp_path / "a", config)
    out = weightsteer.merge(adapter, tmp_path / "m", coeff=1)
    assert (out / "config.json").read_bytes() == (base / "config.json").read_bytes()
    assert "lm_head.weight" not in load_file(out / "model.safetensors")
    assert_base_identical(base, weightsteer.merge(adapter, tmp_path / "zero", coeff=0))


def test_lora_token_rows_tied_with_separate_head_rows_unties(bases, tmp_path):
    adapter = ROWS["lora-token-rows-tied-separate-head"].adapter(bases("llama_tied"), tmp_path / "a")
    out = weightsteer.merge(adapter, tmp_path / "m", coeff=1)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False


def test_runtime_restores_rows_exactly(bases, tmp_path):
    adapter = make_adapter(bases("llama_tied"), tmp_path / "a", TrainableTokensConfig(token_indices=TOKEN_IDS))
    model = PeftModel.from_pretrained(load_base(bases("llama_tied")), adapter).eval()
    before = {name: p.clone() for name, p in model.state_dict().items()}
    with torch.no_grad(), weightsteer.scaled(model, -0.5):
        model(TOKENS)
    assert all(torch.equal(p, before[name]) for name, p in model.state_dict().items())


def test_rows_not_matching_config_are_refused(bases, tmp_path):
    adapter = make_adapter(bases("llama"), tmp_path / "a", TrainableTokensConfig(token_indices=TOKEN_IDS))
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["token_indices"] = TOKEN_IDS[:2]
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(weightsteer.AdapterError, match="rows for 2 token indices"):
        weightsteer.merge(adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()

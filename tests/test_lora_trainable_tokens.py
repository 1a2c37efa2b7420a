"""LoRA with trainable_token_indices: the token rows merge like TrainableTokens."""

from __future__ import annotations

import json

import pytest
from peft import LoraConfig
from safetensors.torch import load_file

import weightsteer
from conftest import assert_base_identical, assert_matches_runtime, make_adapter

COEFFS = (-1, -0.5, 0, 0.5, 1, 2)
TOKEN_IDS = [1, 5, 9, 42, 100]


@pytest.mark.parametrize("arch", ["llama", "llama_tied", "gemma"])
@pytest.mark.parametrize("scheme", [None, "delta", "knob:scaling"])
def test_lora_with_token_rows(bases, tmp_path, arch, scheme):
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], trainable_token_indices=TOKEN_IDS)
    adapter = make_adapter(bases(arch), tmp_path / "a", config)
    assert_matches_runtime(bases(arch), adapter, tmp_path, COEFFS, scheme)


def test_tied_stays_tied(bases, tmp_path):
    base = bases("llama_tied")
    config = LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": TOKEN_IDS})
    adapter = make_adapter(base, tmp_path / "a", config)
    out = weightsteer.merge(adapter, tmp_path / "m", coeff=1)
    assert (out / "config.json").read_bytes() == (base / "config.json").read_bytes()
    assert "lm_head.weight" not in load_file(out / "model.safetensors")
    assert_base_identical(base, weightsteer.merge(adapter, tmp_path / "zero", coeff=0))


def test_tied_with_separate_head_rows_unties(bases, tmp_path):
    base = bases("llama_tied")
    config = LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": TOKEN_IDS, "lm_head": [3, 42, 77]})
    adapter = make_adapter(base, tmp_path / "a", config)
    assert_matches_runtime(base, adapter, tmp_path, COEFFS)
    out = weightsteer.merge(adapter, tmp_path / "m", coeff=1)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False

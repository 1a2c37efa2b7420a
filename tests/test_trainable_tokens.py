"""TrainableTokens: retrained embedding rows, untied and tied (the head shares the rows)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, TrainableTokensConfig
from safetensors.torch import load_file

import weightsteer
from conftest import TOKENS, assert_base_identical, assert_matches_runtime, load_base, make_adapter

COEFFS = (-1, -0.5, 0, 0.5, 1, 2)
TOKEN_IDS = [1, 5, 9, 42, 100]  # all occur in conftest.TOKENS


@pytest.mark.parametrize("arch", ["llama", "llama_tied"])
@pytest.mark.parametrize("scheme", [None, "delta", "knob:trainable_tokens_delta"])
def test_all_schemes(bases, tmp_path, arch, scheme):
    adapter = make_adapter(bases(arch), tmp_path / "a", TrainableTokensConfig(token_indices=TOKEN_IDS))
    assert_matches_runtime(bases(arch), adapter, tmp_path, COEFFS, scheme)


def test_tied_stays_tied(bases, tmp_path):
    base = bases("llama_tied")
    adapter = make_adapter(base, tmp_path / "a", TrainableTokensConfig(token_indices=TOKEN_IDS))
    out = weightsteer.merge(adapter, tmp_path / "m", coeff=2)
    assert (out / "config.json").read_bytes() == (base / "config.json").read_bytes()
    merged, original = load_file(out / "model.safetensors"), load_file(base / "model.safetensors")
    assert merged.keys() == original.keys() and "lm_head.weight" not in merged
    changed = (merged["model.embed_tokens.weight"] != original["model.embed_tokens.weight"]).any(dim=1)
    assert changed.nonzero().flatten().tolist() == TOKEN_IDS


def test_coeff_zero_is_base_bit_for_bit(bases, tmp_path):
    adapter = make_adapter(bases("llama_tied"), tmp_path / "a", TrainableTokensConfig(token_indices=TOKEN_IDS))
    assert_base_identical(bases("llama_tied"), weightsteer.merge(adapter, tmp_path / "zero", coeff=0))


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

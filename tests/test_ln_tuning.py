"""LN Tuning: trained copies of norms (RMSNorm, LayerNorm with bias) and of a Linear, interpolated."""

from __future__ import annotations

import pytest
import torch
from peft import LNTuningConfig, PeftModel
from safetensors.torch import load_file

import weightsteer
from conftest import TOKENS, assert_base_identical, assert_matches_runtime, load_base, make_adapter

COEFFS = (-1, -0.5, 0, 0.5, 1, 2)
LLAMA_NORMS = ["input_layernorm", "post_attention_layernorm", "norm"]


@pytest.mark.parametrize("scheme", [None, "delta", "knob:ln_tuning_layers"])
def test_llama_rmsnorm(bases, tmp_path, scheme):
    adapter = make_adapter(bases("llama"), tmp_path / "a", LNTuningConfig(target_modules=LLAMA_NORMS))
    assert_matches_runtime(bases("llama"), adapter, tmp_path, COEFFS, scheme)


@pytest.mark.parametrize("scheme", [None, "delta"])
def test_gpt2_layernorm_with_bias(bases, tmp_path, scheme):
    adapter = make_adapter(bases("gpt2"), tmp_path / "a", LNTuningConfig(target_modules=["ln_1", "ln_2", "ln_f"]))
    assert_matches_runtime(bases("gpt2"), adapter, tmp_path, COEFFS, scheme)
    out = weightsteer.merge(adapter, tmp_path / "m", coeff=0.5, scheme=scheme)
    merged, base = load_file(out / "model.safetensors"), load_file(bases("gpt2") / "model.safetensors")
    changed = {name for name in base if not (merged[name] == base[name]).all()}
    assert {"transformer.h.0.ln_1.bias", "transformer.ln_f.bias", "transformer.ln_f.weight"} <= changed


def test_linear_target_with_bias_qwen2(bases, tmp_path):
    adapter = make_adapter(bases("qwen2"), tmp_path / "a", LNTuningConfig(target_modules=["q_proj"]), scale=0.02)
    assert_matches_runtime(bases("qwen2"), adapter, tmp_path, COEFFS)


def test_coeff_zero_is_base_bit_for_bit(bases, tmp_path):
    adapter = make_adapter(bases("gpt2"), tmp_path / "a", LNTuningConfig(target_modules=["ln_1", "ln_f"]))
    assert_base_identical(bases("gpt2"), weightsteer.merge(adapter, tmp_path / "zero", coeff=0))


def test_block_target_is_refused(bases, tmp_path):
    adapter = make_adapter(bases("llama"), tmp_path / "a", LNTuningConfig(target_modules=["mlp"]))
    with pytest.raises(weightsteer.UnsupportedAdapterError, match="Target the leaf modules"):
        weightsteer.merge(adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_runtime_restores_exactly(bases, tmp_path):
    adapter = make_adapter(bases("gpt2"), tmp_path / "a", LNTuningConfig(target_modules=["ln_1", "ln_f"]))
    model = PeftModel.from_pretrained(load_base(bases("gpt2")), adapter).eval()
    before = {name: p.clone() for name, p in model.state_dict().items()}
    with torch.no_grad(), weightsteer.scaled(model, 0.3):
        model(TOKENS)
    assert all(torch.equal(p, before[name]) for name, p in model.state_dict().items())

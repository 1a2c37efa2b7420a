"""LN Tuning edge cases: which tensors change, a block target refused, the runtime restored exactly. The
runtime-match rows (trained copies of RMSNorm, LayerNorm with bias and a Linear, interpolated) are in tests/cases.py."""

from __future__ import annotations

import pytest
import torch
from peft import LNTuningConfig, PeftModel
from safetensors.torch import load_file

import weightsteer
from cases import ROWS
from conftest import TOKENS, load_base, make_adapter


@pytest.mark.parametrize("scheme", [None, "delta"])
def test_gpt2_layernorm_bias_changes(bases, tmp_path, scheme):
    adapter = ROWS["ln-tuning-layernorm-bias-gpt2"].adapter(bases("gpt2"), tmp_path / "a")
    out = weightsteer.merge(adapter, tmp_path / "m", coeff=0.5, scheme=scheme)
    merged, base = load_file(out / "model.safetensors"), load_file(bases("gpt2") / "model.safetensors")
    changed = {name for name in base if not (merged[name] == base[name]).all()}
    assert {"transformer.h.0.ln_1.bias", "transformer.ln_f.bias", "transformer.ln_f.weight"} <= changed


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

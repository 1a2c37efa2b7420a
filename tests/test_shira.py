"""SHiRA edge cases: indices outside the weight or not matching it, refused. The runtime-match rows (sparse scatter
at the stored positions, int32 or Windows' float32; the scale knob PEFT exposes through set_scale) are in
tests/cases.py."""

from __future__ import annotations

import pytest
from peft import ShiraConfig
from safetensors.torch import load_file, save_file

import weightsteer
from conftest import make_adapter

WEIGHTS = "adapter_model.safetensors"


def test_indices_outside_the_weight_are_refused(bases, tmp_path):
    adapter = make_adapter(bases("llama"), tmp_path / "a", ShiraConfig(r=2, target_modules=["k_proj"]))
    tensors = load_file(adapter / WEIGHTS)
    key = next(k for k in tensors if k.endswith("layers.0.self_attn.k_proj.shira_indices"))
    tensors[key][0, 0] = 40  # k_proj has 32 rows
    save_file(tensors, adapter / WEIGHTS)
    with pytest.raises(weightsteer.AdapterError, match=r"layers\.0\.self_attn\.k_proj: weight shape"):
        weightsteer.merge(adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_indices_not_matching_weights_are_refused(bases, tmp_path):
    adapter = make_adapter(bases("llama"), tmp_path / "a", ShiraConfig(r=2, target_modules=["q_proj"]))
    tensors = load_file(adapter / WEIGHTS)
    key = next(k for k in tensors if k.endswith("layers.1.self_attn.q_proj.shira_indices"))
    tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, adapter / WEIGHTS)
    with pytest.raises(weightsteer.AdapterError, match=r"layers\.1\.self_attn\.q_proj: shira_indices has shape"):
        weightsteer.merge(adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()

"""SHiRA family: sparse scatter at the stored positions (int32 or Windows' float32), Llama and Qwen2
(biases), the scale knob PEFT exposes through set_scale, refusals."""

from __future__ import annotations

import pytest
import torch
from peft import ShiraConfig
from safetensors.torch import load_file, save_file

import weightsteer
from conftest import assert_base_identical, assert_matches_runtime, make_adapter

COEFFS = (-1, -0.5, 0, 0.5, 1, 2)
ATTN_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WEIGHTS = "adapter_model.safetensors"


@pytest.mark.parametrize("scheme", [None, "delta", "knob:scaling", "knob:shira_weight"])
def test_shira_llama_all_schemes(bases, tmp_path, scheme):
    adapter = make_adapter(bases("llama"), tmp_path / "a", ShiraConfig(r=2, target_modules=ATTN_MLP), scale=0.3)
    assert_matches_runtime(bases("llama"), adapter, tmp_path, COEFFS, scheme)


def test_shira_qwen2_float_indices(bases, tmp_path):
    """Indices saved as float32 (PEFT does so on Windows) are positions all the same."""
    adapter = make_adapter(bases("qwen2"), tmp_path / "a", ShiraConfig(r=2, target_modules=ATTN_MLP), scale=0.3)
    tensors = load_file(adapter / WEIGHTS)
    assert all(v.dtype == torch.int32 for k, v in tensors.items() if k.endswith("shira_indices"))
    save_file({k: v.float() if k.endswith("shira_indices") else v for k, v in tensors.items()}, adapter / WEIGHTS)
    assert_matches_runtime(bases("qwen2"), adapter, tmp_path, COEFFS)


def test_coeff_zero_is_base_bit_for_bit(bases, tmp_path):
    adapter = make_adapter(bases("llama:sharded"), tmp_path / "a", ShiraConfig(r=2, target_modules=ATTN_MLP))
    out = weightsteer.merge(adapter, tmp_path / "zero", coeff=0)
    assert_base_identical(bases("llama:sharded"), out)


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

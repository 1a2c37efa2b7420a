"""C3A family: block-circulant closed form against PEFT's FFT forward, Llama and Qwen2 (biases), refusals."""

from __future__ import annotations

import pytest
import torch
from peft import C3AConfig, PeftModel
from safetensors.torch import load_file, save_file

import weightsteer
from conftest import assert_base_identical, assert_matches_runtime, load_base, make_adapter
from weightsteer.adapters.base import ModuleState
from weightsteer.adapters.c3a import C3A

COEFFS = (-1, -0.5, 0, 0.5, 1, 2)
ATTN_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WEIGHTS = "adapter_model.safetensors"


@pytest.mark.parametrize("scheme", [None, "delta", "knob:c3a_kernel"])
def test_c3a_llama_all_schemes(bases, tmp_path, scheme):
    adapter = make_adapter(bases("llama"), tmp_path / "a", C3AConfig(block_size=16, target_modules=ATTN_MLP), scale=1.0)
    assert_matches_runtime(bases("llama"), adapter, tmp_path, COEFFS, scheme)


def test_c3a_qwen2_block_size_pattern(bases, tmp_path):
    config = C3AConfig(block_size=32, block_size_pattern={"k_proj": 16}, target_modules=ATTN_MLP)
    adapter = make_adapter(bases("qwen2"), tmp_path / "a", config, scale=1.0)
    assert_matches_runtime(bases("qwen2"), adapter, tmp_path, COEFFS)


def test_block_circulant_equals_peft_delta(bases, tmp_path):
    """The gathered circulant blocks equal PEFT's own FFT-built delta (get_delta_weight)."""
    config = C3AConfig(block_size=8, target_modules=["down_proj"])
    adapter = make_adapter(bases("llama"), tmp_path / "a", config, scale=1.0)
    layer = PeftModel.from_pretrained(load_base(bases("llama")), adapter).base_model.model.model.layers[0].mlp.down_proj
    kernel = layer.c3a_kernel["default"].detach()
    weight = torch.zeros_like(layer.get_base_layer().weight)
    ours = C3A().weight(ModuleState("down_proj", {"c3a_kernel": kernel}), weight)
    torch.testing.assert_close(ours, layer.get_delta_weight("default").detach(), atol=1e-7, rtol=1e-5)


def test_coeff_zero_is_base_bit_for_bit(bases, tmp_path):
    adapter = make_adapter(bases("llama:sharded"), tmp_path / "a", C3AConfig(block_size=16, target_modules=ATTN_MLP))
    out = weightsteer.merge(adapter, tmp_path / "zero", coeff=0)
    assert_base_identical(bases("llama:sharded"), out)


def test_wrong_kernel_shape_is_refused(bases, tmp_path):
    adapter = make_adapter(bases("llama"), tmp_path / "a", C3AConfig(block_size=16, target_modules=["v_proj"]))
    tensors = load_file(adapter / WEIGHTS)
    key = next(k for k in tensors if k.endswith("layers.0.self_attn.v_proj.c3a_kernel"))
    tensors[key] = torch.cat([tensors[key], tensors[key]])
    save_file(tensors, adapter / WEIGHTS)
    with pytest.raises(weightsteer.AdapterError, match=r"layers\.0\.self_attn\.v_proj: weight shape"):
        weightsteer.merge(adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()

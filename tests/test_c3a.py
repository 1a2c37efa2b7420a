"""C3A edge cases: the block-circulant closed form against PEFT's FFT delta, a refusal. The runtime-match rows
(Llama, Qwen2 biases with a block_size_pattern) are in tests/cases.py."""

from __future__ import annotations

import pytest
import torch
from peft import C3AConfig, PeftModel
from safetensors.torch import load_file, save_file

import weightsteer
from conftest import load_base, make_adapter
from weightsteer.adapters.base import ModuleState
from weightsteer.adapters.c3a import C3A

WEIGHTS = "adapter_model.safetensors"


def test_block_circulant_equals_peft_delta(bases, tmp_path):
    """The gathered circulant blocks equal PEFT's own FFT-built delta (get_delta_weight)."""
    config = C3AConfig(block_size=8, target_modules=["down_proj"])
    adapter = make_adapter(bases("llama"), tmp_path / "a", config, scale=1.0)
    layer = PeftModel.from_pretrained(load_base(bases("llama")), adapter).base_model.model.model.layers[0].mlp.down_proj
    kernel = layer.c3a_kernel["default"].detach()
    weight = torch.zeros_like(layer.get_base_layer().weight)
    ours = C3A().weight(ModuleState("down_proj", {"c3a_kernel": kernel}), weight)
    torch.testing.assert_close(ours, layer.get_delta_weight("default").detach(), atol=1e-7, rtol=1e-5)


def test_wrong_kernel_shape_is_refused(bases, tmp_path):
    adapter = make_adapter(bases("llama"), tmp_path / "a", C3AConfig(block_size=16, target_modules=["v_proj"]))
    tensors = load_file(adapter / WEIGHTS)
    key = next(k for k in tensors if k.endswith("layers.0.self_attn.v_proj.c3a_kernel"))
    tensors[key] = torch.cat([tensors[key], tensors[key]])
    save_file(tensors, adapter / WEIGHTS)
    with pytest.raises(weightsteer.AdapterError, match=r"layers\.0\.self_attn\.v_proj: weight shape"):
        weightsteer.merge(adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()

"""VB-LoRA edge cases: the quadratic bank knob, the branch scale at runtime (and its exact restore), refusals. The
runtime-match rows (full logits and top-k-only files, Llama, Qwen2 biases, GPT-2 Conv1D) are in tests/cases.py."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, VBLoRAConfig
from safetensors.torch import load_file, save_file

import weightsteer
from conftest import TOKENS, load_base, make_adapter

WEIGHTS = "adapter_model.safetensors"


def _config(**kwargs) -> VBLoRAConfig:
    return VBLoRAConfig(**{"r": 4, "vector_length": 16, "num_vectors": 32, "topk": 2, **kwargs})


def test_bank_knob_is_quadratic(bases, tmp_path):
    """Scaling the shared bank by c scales both factors: c = −1 gives the trained model, not its mirror."""
    adapter = make_adapter(bases("llama"), tmp_path / "a", _config(target_modules=["q_proj", "v_proj"]), scale=1.0)
    weightsteer.merge(adapter, tmp_path / "bank", coeff=-1, scheme="knob:vblora_vector_bank")
    weightsteer.merge(adapter, tmp_path / "one", coeff=1)
    bank, one = load_file(tmp_path / "bank" / "model.safetensors"), load_file(tmp_path / "one" / "model.safetensors")
    assert all(torch.allclose(bank[name], one[name], atol=1e-6) for name in one)


def test_runtime_branch_scale_is_restored_exactly(bases, tmp_path):
    adapter = make_adapter(bases("llama"), tmp_path / "a", _config(target_modules=["q_proj", "down_proj"]), scale=1.0)
    model = PeftModel.from_pretrained(load_base(bases("llama")), adapter).eval()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    slot = layer.vblora_dropout["default"]
    with torch.no_grad():
        before = model(TOKENS).logits
        with weightsteer.scaled(model, -0.5):
            assert layer.vblora_dropout["default"] is not slot
        after = model(TOKENS).logits
    assert layer.vblora_dropout["default"] is slot
    assert torch.equal(before, after)


def test_missing_vector_bank_is_refused(bases, tmp_path):
    adapter = make_adapter(bases("llama"), tmp_path / "a", _config(target_modules=["q_proj"]))
    tensors = {k: v for k, v in load_file(adapter / WEIGHTS).items() if "vector_bank" not in k}
    save_file(tensors, adapter / WEIGHTS)
    with pytest.raises(weightsteer.AdapterError, match="lacks base_model.vblora_vector_bank"):
        weightsteer.merge(adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_wrong_logits_shape_is_refused(bases, tmp_path):
    adapter = make_adapter(bases("llama"), tmp_path / "a", _config(target_modules=["k_proj"]))
    tensors = load_file(adapter / WEIGHTS)
    key = next(k for k in tensors if k.endswith("layers.1.self_attn.k_proj.vblora_logits_B"))
    tensors[key] = torch.cat([tensors[key], tensors[key]])
    save_file(tensors, adapter / WEIGHTS)
    with pytest.raises(weightsteer.AdapterError, match=r"layers\.1\.self_attn\.k_proj: output features"):
        weightsteer.merge(adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()

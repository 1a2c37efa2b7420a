"""RandLoRA edge cases: regenerated (dense and sparse) bases equal PEFT's, refusals. The runtime-match rows
(saved and regenerated bases, in ≤ out and in > out layers, Llama, Qwen2 biases, GPT-2 Conv1D) are in tests/cases.py."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, RandLoraConfig
from safetensors.torch import load_file, save_file

import weightsteer
from conftest import load_base, make_adapter
from weightsteer.adapters import load_adapter
from weightsteer.adapters.base import ShapeLookup

GPT2_ALL = ["c_attn", "c_proj", "c_fc"]
WEIGHTS = "adapter_model.safetensors"


def _config(**kwargs) -> RandLoraConfig:
    # α = r keeps the (large by default) update moderate, so fp32 logits stay comparable at 1e-4.
    return RandLoraConfig(**{"r": 8, "randlora_alpha": 8, **kwargs})


@pytest.mark.parametrize(
    "arch, options",
    [("llama", {}), ("gpt2", {"fan_in_fan_out": True}), ("llama", {"sparse": True}), ("llama", {"very_sparse": True})],
)
def test_regenerated_bases_equal_peft(bases, tmp_path, arch, options):
    """Bit for bit what PEFT draws from projection_prng_key, sized by the largest targeted layer."""
    targets = GPT2_ALL if arch == "gpt2" else ["k_proj", "up_proj"]
    config = _config(target_modules=targets, save_projection=False, projection_prng_key=11, **options)
    adapter_path = make_adapter(bases(arch), tmp_path / "a", config)
    shapes = ShapeLookup({k: tuple(v.shape) for k, v in load_file(bases(arch) / "model.safetensors").items()})
    state = load_adapter(adapter_path).modules(shapes)[0]
    peft_model = PeftModel.from_pretrained(load_base(bases(arch)), adapter_path)
    for name in ("randlora_A", "randlora_B"):
        assert torch.equal(state.tensors[name], getattr(peft_model.base_model, name)["default"]), name


def test_wrong_gamma_width_is_refused(bases, tmp_path):
    adapter = make_adapter(bases("llama"), tmp_path / "a", _config(target_modules=["q_proj", "k_proj"]))
    tensors = load_file(adapter / WEIGHTS)
    key = next(k for k in tensors if k.endswith("layers.0.self_attn.k_proj.randlora_gamma"))
    tensors[key] = torch.cat([tensors[key], tensors[key]], dim=1)
    save_file(tensors, adapter / WEIGHTS)
    with pytest.raises(weightsteer.AdapterError, match=r"layers\.0\.self_attn\.k_proj: min\(out, in\)"):
        weightsteer.merge(adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bases_knob_is_not_offered(bases, tmp_path):
    adapter = make_adapter(bases("llama"), tmp_path / "a", _config(target_modules=["q_proj"]))
    with pytest.raises(weightsteer.SchemeError, match="no parameter 'randlora_A'"):
        weightsteer.merge(adapter, tmp_path / "out", scheme="knob:randlora_A")
    assert not (tmp_path / "out").exists()

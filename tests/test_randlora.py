"""RandLoRA family: saved and regenerated (dense and sparse) bases, in ≤ out and in > out layers,
Llama, Qwen2 (biases), GPT-2 Conv1D, refusals."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, RandLoraConfig
from safetensors.torch import load_file, save_file

import weightsteer
from conftest import assert_base_identical, assert_matches_runtime, load_base, make_adapter
from weightsteer.adapters import load_adapter
from weightsteer.adapters.base import ShapeLookup

COEFFS = (-1, -0.5, 0, 0.5, 1, 2)
# k_proj/v_proj/down_proj have in > out (the transposed product), q/o square, gate/up in < out.
ATTN_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_ALL = ["c_attn", "c_proj", "c_fc"]
WEIGHTS = "adapter_model.safetensors"


def _config(**kwargs) -> RandLoraConfig:
    # α = r keeps the (large by default) update moderate, so fp32 logits stay comparable at 1e-4.
    return RandLoraConfig(**{"r": 8, "randlora_alpha": 8, **kwargs})


@pytest.mark.parametrize("scheme", [None, "delta", "knob:scaling", "knob:randlora_gamma"])
def test_randlora_llama_all_schemes(bases, tmp_path, scheme):
    adapter = make_adapter(bases("llama"), tmp_path / "a", _config(target_modules=ATTN_MLP), scale=0.02)
    tensors = load_file(adapter / WEIGHTS)
    assert "base_model.randlora_A" in tensors and any(k.endswith("q_proj.randlora_A") for k in tensors)
    assert_matches_runtime(bases("llama"), adapter, tmp_path, COEFFS, scheme)


def test_randlora_qwen2_regenerated_bases(bases, tmp_path):
    config = _config(target_modules=ATTN_MLP, save_projection=False, projection_prng_key=5)
    adapter = make_adapter(bases("qwen2"), tmp_path / "a", config, scale=0.02)
    assert not any("randlora_A" in k for k in load_file(adapter / WEIGHTS))
    assert_matches_runtime(bases("qwen2"), adapter, tmp_path, COEFFS)


@pytest.mark.parametrize("save_projection", [True, False])
def test_randlora_conv1d_gpt2(bases, tmp_path, save_projection):
    config = _config(target_modules=GPT2_ALL, fan_in_fan_out=True, save_projection=save_projection)
    adapter = make_adapter(bases("gpt2"), tmp_path / "a", config, scale=0.02)
    assert_matches_runtime(bases("gpt2"), adapter, tmp_path, COEFFS)


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


def test_coeff_zero_is_base_bit_for_bit(bases, tmp_path):
    adapter = make_adapter(bases("llama:sharded"), tmp_path / "a", _config(target_modules=ATTN_MLP))
    out = weightsteer.merge(adapter, tmp_path / "zero", coeff=0)
    assert_base_identical(bases("llama:sharded"), out)


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

"""VeRA edge cases: biases untouched, regenerated projections equal PEFT's, refusals. The runtime-match rows
(saved and regenerated projections, Llama, Qwen2, GPT-2 Conv1D) are in tests/cases.py."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, VeraConfig
from safetensors.torch import load_file, save_file

import weightsteer
from cases import ROWS
from conftest import load_base, make_adapter
from weightsteer.adapters import load_adapter
from weightsteer.adapters.base import ShapeLookup

WEIGHTS = "adapter_model.safetensors"


def test_vera_qwen2_biases_untouched(bases, tmp_path):
    adapter = ROWS["vera-regenerated-qwen2-bias"].adapter(bases("qwen2"), tmp_path / "a")
    out = weightsteer.merge(adapter, tmp_path / "m", coeff=1)
    merged, base = load_file(out / "model.safetensors"), load_file(bases("qwen2") / "model.safetensors")
    biases = [name for name in base if name.endswith(".bias")]
    assert biases and all(torch.equal(merged[n], base[n]) for n in biases)


@pytest.mark.parametrize("arch, targets", [("gpt2", ["c_attn", "c_fc"]), ("llama", ["k_proj", "down_proj"])])
def test_regenerated_projections_equal_peft(bases, tmp_path, arch, targets):
    """Bit for bit what PEFT draws: sized by the largest (out, in) over all targeted layers, Conv1D transposed."""
    config = VeraConfig(r=6, target_modules=targets, fan_in_fan_out=arch == "gpt2", save_projection=False)
    adapter_path = make_adapter(bases(arch), tmp_path / "a", config)
    adapter = load_adapter(adapter_path)
    shapes = ShapeLookup({k: tuple(v.shape) for k, v in load_file(bases(arch) / "model.safetensors").items()})
    state = adapter.modules(shapes)[0]
    peft_model = PeftModel.from_pretrained(load_base(bases(arch)), adapter_path)
    for name in ("vera_A", "vera_B"):
        assert torch.equal(state.tensors[name], getattr(peft_model.base_model, name)["default"]), name


def test_wrong_lambda_b_length_is_refused(bases, tmp_path):
    adapter = make_adapter(bases("llama"), tmp_path / "a", VeraConfig(r=8, target_modules=["q_proj", "k_proj"]))
    tensors = load_file(adapter / WEIGHTS)
    key = next(k for k in tensors if k.endswith("layers.0.self_attn.k_proj.vera_lambda_b"))
    tensors[key] = torch.cat([tensors[key], tensors[key]])
    save_file(tensors, adapter / WEIGHTS)
    with pytest.raises(weightsteer.AdapterError, match=r"layers\.0\.self_attn\.k_proj: output features"):
        weightsteer.merge(adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsized_module_without_projections_is_refused(bases, tmp_path):
    config = VeraConfig(r=8, target_modules=["q_proj"], save_projection=False)
    adapter = make_adapter(bases("llama"), tmp_path / "a", config)
    tensors = {k.replace("layers.1.", "layers.9."): v for k, v in load_file(adapter / WEIGHTS).items()}
    save_file(tensors, adapter / WEIGHTS)
    message = r"layers\.9\.self_attn\.q_proj: the base has no .*projection_prng_key"
    with pytest.raises(weightsteer.AdapterError, match=message):
        weightsteer.merge(adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()

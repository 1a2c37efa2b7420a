"""DeLoRA edge cases: biases untouched, refusals. The runtime-match rows (rank/lambda patterns, biases,
the stored column norms) are in tests/cases.py."""

from __future__ import annotations

import pytest
from peft import DeloraConfig
from safetensors.torch import load_file, save_file

import weightsteer
from cases import ROWS
from conftest import make_adapter

WEIGHTS = "adapter_model.safetensors"


def delora_config(**kwargs) -> DeloraConfig:
    return DeloraConfig(r=4, delora_lambda=2, **kwargs)


def test_delora_qwen2_biases_untouched(bases, tmp_path):
    adapter = ROWS["delora-qwen2-bias"].adapter(bases("qwen2"), tmp_path / "a")
    out = weightsteer.merge(adapter, tmp_path / "m", coeff=1)
    merged, base = load_file(out / "model.safetensors"), load_file(bases("qwen2") / "model.safetensors")
    biases = [name for name in base if name.endswith(".bias")]
    assert biases and all((merged[n] == base[n]).all() for n in biases)


def test_wrong_norm_length_is_refused(bases, tmp_path):
    adapter = make_adapter(bases("llama"), tmp_path / "a", delora_config(target_modules=["q_proj"]))
    tensors = load_file(adapter / WEIGHTS)
    key = next(k for k in tensors if k.endswith("layers.0.self_attn.q_proj.delora_w_norm"))
    tensors[key] = tensors[key][:10].contiguous()
    save_file(tensors, adapter / WEIGHTS)
    with pytest.raises(weightsteer.AdapterError, match=r"layers\.0\.self_attn\.q_proj: .*delora_w_norm has length 10"):
        weightsteer.merge(adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_tensor_is_refused(bases, tmp_path):
    adapter = make_adapter(bases("llama"), tmp_path / "a", delora_config(target_modules=["q_proj"]))
    dropped = "layers.1.self_attn.q_proj.delora_lambda"
    tensors = {k: v for k, v in load_file(adapter / WEIGHTS).items() if not k.endswith(dropped)}
    save_file(tensors, adapter / WEIGHTS)
    with pytest.raises(weightsteer.AdapterError, match=r"layers\.1\.self_attn\.q_proj lacks delora_lambda"):
        weightsteer.merge(adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()

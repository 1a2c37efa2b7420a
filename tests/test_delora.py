"""DeLoRA family: rank/lambda patterns on Llama, biases on Qwen2, the stored column norms, refusals."""

from __future__ import annotations

import pytest
from peft import DeloraConfig
from safetensors.torch import load_file, save_file

import weightsteer
from conftest import assert_base_identical, assert_matches_runtime, make_adapter

COEFFS = (-1, -0.5, 0, 0.5, 1, 2)
ATTN_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WEIGHTS = "adapter_model.safetensors"


def delora_config(**kwargs) -> DeloraConfig:
    return DeloraConfig(r=4, delora_lambda=2, **kwargs)


@pytest.mark.parametrize("scheme", [None, "delta", "knob:delora_lambda", "knob:delora_B"])
def test_delora_llama_all_schemes(bases, tmp_path, scheme):
    config = delora_config(
        target_modules=ATTN_MLP, rank_pattern={"down_proj": 2}, lambda_pattern={"layers.1.self_attn.q_proj": 5}
    )
    adapter = make_adapter(bases("llama"), tmp_path / "a", config)
    assert_matches_runtime(bases("llama"), adapter, tmp_path, COEFFS, scheme)


@pytest.mark.parametrize("scheme", [None, "delta", "knob:delora_A"])
def test_delora_qwen2_biases_untouched(bases, tmp_path, scheme):
    adapter = make_adapter(bases("qwen2"), tmp_path / "a", delora_config(target_modules=ATTN_MLP))
    assert_matches_runtime(bases("qwen2"), adapter, tmp_path, COEFFS, scheme)
    out = weightsteer.merge(adapter, tmp_path / "m", coeff=1)
    merged, base = load_file(out / "model.safetensors"), load_file(bases("qwen2") / "model.safetensors")
    biases = [name for name in base if name.endswith(".bias")]
    assert biases and all((merged[n] == base[n]).all() for n in biases)


def test_stored_column_norms_are_used(bases, tmp_path):
    """PEFT's forward reads the saved delora_w_norm, not the base's current norms: so must the merge."""
    adapter = make_adapter(bases("llama"), tmp_path / "a", delora_config(target_modules=["q_proj", "down_proj"]))
    tensors = load_file(adapter / WEIGHTS)
    save_file({k: v * 3 if k.endswith("delora_w_norm") else v for k, v in tensors.items()}, adapter / WEIGHTS)
    assert_matches_runtime(bases("llama"), adapter, tmp_path, (-1, 1, 2))


def test_coeff_zero_is_base_bit_for_bit(bases, tmp_path):
    adapter = make_adapter(bases("llama:sharded"), tmp_path / "a", delora_config(target_modules=ATTN_MLP))
    out = weightsteer.merge(adapter, tmp_path / "zero", coeff=0)
    assert_base_identical(bases("llama:sharded"), out)


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

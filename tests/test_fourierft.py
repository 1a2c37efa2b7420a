"""FourierFT family: positions re-derived from the seed, n_frequency_pattern, Llama, Qwen2 (biases),
GPT-2 Conv1D, every scheme, refusals."""

from __future__ import annotations

import json

import pytest
from peft import FourierFTConfig

import weightsteer
from conftest import assert_base_identical, assert_matches_runtime, make_adapter

COEFFS = (-1, -0.5, 0, 0.5, 1, 2)
ATTN_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("scheme", [None, "delta", "knob:fourierft_spectrum"])
def test_fourierft_llama_all_schemes(bases, tmp_path, scheme):
    config = FourierFTConfig(n_frequency=200, scaling=100.0, target_modules=ATTN_MLP)
    adapter = make_adapter(bases("llama"), tmp_path / "a", config)
    assert_matches_runtime(bases("llama"), adapter, tmp_path, COEFFS, scheme)


def test_fourierft_pattern_and_seed_qwen2(bases, tmp_path):
    config = FourierFTConfig(
        n_frequency=300,
        scaling=50.0,
        random_loc_seed=1234,
        target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
        n_frequency_pattern={"k_proj": 100, "layers.1.mlp.down_proj": 2000},
    )
    adapter = make_adapter(bases("qwen2"), tmp_path / "a", config)
    assert_matches_runtime(bases("qwen2"), adapter, tmp_path, COEFFS)
    assert_matches_runtime(bases("qwen2"), adapter, tmp_path, (-1, 2), "knob:scaling")


def test_fourierft_conv1d_gpt2(bases, tmp_path):
    config = FourierFTConfig(n_frequency=500, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    adapter = make_adapter(bases("gpt2"), tmp_path / "a", config)
    assert_matches_runtime(bases("gpt2"), adapter, tmp_path, COEFFS)


def test_coeff_zero_is_base_bit_for_bit(bases, tmp_path):
    config = FourierFTConfig(n_frequency=100, target_modules=["c_attn", "c_fc"])
    adapter = make_adapter(bases("gpt2"), tmp_path / "a", config)
    out = weightsteer.merge(adapter, tmp_path / "zero", coeff=0)
    assert_base_identical(bases("gpt2"), out)


def test_n_frequency_disagreeing_with_spectrum_is_refused(bases, tmp_path):
    adapter = make_adapter(bases("llama"), tmp_path / "a", FourierFTConfig(n_frequency=100, target_modules=["q_proj"]))
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["n_frequency_pattern"] = {"q_proj": 50}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    expected = r"q_proj stores 100 frequencies but adapter_config.json gives n_frequency = 50"
    with pytest.raises(weightsteer.AdapterError, match=expected):
        weightsteer.merge(adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()

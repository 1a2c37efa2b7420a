"""LoKr family: whole factors with rank/alpha patterns (r from the config, not the shapes),
decompose_both, every scheme, Qwen2 (biases), refusals.

PEFT rejects Conv1D for LoKr (TypeError at injection), so there is no GPT-2 case.
"""

from __future__ import annotations

import json

import pytest
from peft import LoKrConfig
from safetensors.torch import load_file

import weightsteer
from conftest import assert_base_identical, assert_matches_runtime, make_adapter

COEFFS = (-1, -0.5, 0, 0.5, 1, 2)
ATTN_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def saved_names(adapter) -> set[str]:
    return {key.rsplit(".", 1)[-1] for key in load_file(adapter / "adapter_model.safetensors")}


@pytest.mark.parametrize("scheme", [None, "delta", "knob:lokr_w1"])
def test_lokr_full_factors_llama_all_schemes(bases, tmp_path, scheme):
    config = LoKrConfig(
        r=8,
        alpha=4,
        target_modules=ATTN_MLP,
        rank_pattern={"o_proj": 6, "layers.1.mlp.up_proj": 16},
        alpha_pattern={"layers.0.self_attn.q_proj": 12},
    )
    adapter = make_adapter(bases("llama"), tmp_path / "a", config)
    assert saved_names(adapter) == {"lokr_w1", "lokr_w2"}, "every factor should be stored whole"
    assert_matches_runtime(bases("llama"), adapter, tmp_path, COEFFS, scheme)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lokr_decompose_both(bases, tmp_path, arch):
    config = LoKrConfig(r=2, alpha=6, decompose_both=True, target_modules=ATTN_MLP, rank_pattern={"k_proj": 1})
    adapter = make_adapter(bases(arch), tmp_path / "a", config)
    assert saved_names(adapter) == {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}
    assert_matches_runtime(bases(arch), adapter, tmp_path, COEFFS)


def test_lokr_decompose_factor_mixed_forms(bases, tmp_path):
    config = LoKrConfig(r=3, alpha=5, decompose_both=True, decompose_factor=4, target_modules=ATTN_MLP)
    adapter = make_adapter(bases("qwen2"), tmp_path / "a", config)
    assert {"lokr_w1", "lokr_w2_a"} <= saved_names(adapter)
    assert_matches_runtime(bases("qwen2"), adapter, tmp_path, COEFFS)
    assert_matches_runtime(bases("qwen2"), adapter, tmp_path, (-1, 2), "knob:scaling")


def test_coeff_zero_is_base_bit_for_bit(bases, tmp_path):
    config = LoKrConfig(r=2, decompose_both=True, target_modules=ATTN_MLP)
    adapter = make_adapter(bases("llama:sharded"), tmp_path / "a", config)
    out = weightsteer.merge(adapter, tmp_path / "zero", coeff=0)
    assert_base_identical(bases("llama:sharded"), out)


def test_rank_pattern_disagreeing_with_tensors_is_refused(bases, tmp_path):
    config = LoKrConfig(r=2, decompose_both=True, target_modules=["q_proj"])
    adapter = make_adapter(bases("llama"), tmp_path / "a", config)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["rank_pattern"] = {"q_proj": 3}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    expected = r"q_proj: lokr_w1_b has rank 2 but adapter_config.json gives r = 3"
    with pytest.raises(weightsteer.AdapterError, match=expected):
        weightsteer.merge(adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()

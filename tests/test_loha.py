"""LoHa family: Llama with every scheme, Qwen2 (biases) with rank/alpha patterns, refusals.

PEFT rejects Conv1D for LoHa (TypeError at injection), so there is no GPT-2 case.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoHaConfig

import weightsteer
from conftest import assert_base_identical, assert_matches_runtime, make_adapter

COEFFS = (-1, -0.5, 0, 0.5, 1, 2)
ATTN_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("scheme", [None, "delta", "knob:hada_w1_a"])
def test_loha_llama_all_schemes(bases, tmp_path, scheme):
    adapter = make_adapter(bases("llama"), tmp_path / "a", LoHaConfig(r=4, alpha=8, target_modules=ATTN_MLP))
    assert_matches_runtime(bases("llama"), adapter, tmp_path, COEFFS, scheme)


def test_loha_patterns_qwen2(bases, tmp_path):
    config = LoHaConfig(
        r=4,
        alpha=8,
        target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
        rank_pattern={"k_proj": 2, "layers.1.mlp.down_proj": 6},
        alpha_pattern={"layers.0.self_attn.q_proj": 3, "v_proj": 16},
    )
    adapter = make_adapter(bases("qwen2"), tmp_path / "a", config)
    assert_matches_runtime(bases("qwen2"), adapter, tmp_path, COEFFS)
    assert_matches_runtime(bases("qwen2"), adapter, tmp_path, (-1, 2), "knob:scaling")


def test_coeff_zero_is_base_bit_for_bit(bases, tmp_path):
    adapter = make_adapter(bases("llama:sharded"), tmp_path / "a", LoHaConfig(r=4, target_modules=ATTN_MLP))
    out = weightsteer.merge(adapter, tmp_path / "zero", coeff=0)
    assert_base_identical(bases("llama:sharded"), out)


def test_rank_pattern_disagreeing_with_tensors_is_refused(bases, tmp_path):
    adapter = make_adapter(bases("llama"), tmp_path / "a", LoHaConfig(r=4, target_modules=["q_proj", "v_proj"]))
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["rank_pattern"] = {"v_proj": 2}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    expected = r"v_proj: hada_w1_b has rank 4 but adapter_config.json gives r = 2"
    with pytest.raises(weightsteer.AdapterError, match=expected):
        weightsteer.merge(adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_conv_base_is_refused():
    from weightsteer.adapters.base import ShapeLookup
    from weightsteer.adapters.loha import FACTORS, LoHa

    shapes = {"hada_w1_a": (8, 4), "hada_w1_b": (4, 36), "hada_w2_a": (8, 4), "hada_w2_b": (4, 36)}
    tensors = {f"base_model.model.conv.{name}": torch.ones(shapes[name]) for name in FACTORS}
    (state,) = LoHa().parse({"r": 4, "alpha": 4}, tensors, ShapeLookup({}), {})
    with pytest.raises(weightsteer.UnsupportedAdapterError, match="Linear and Conv1D layers"):
        LoHa().check_shapes(state, (8, 4, 3, 3), None)

"""LoHa and LoKr (LyCORIS) edge cases: rank patterns disagreeing with the tensors, a conv base. The
runtime-match rows (every scheme, rank/alpha patterns, whole and decomposed LoKr factors) are in tests/cases.py.

PEFT rejects Conv1D for both (TypeError at injection), so there is no GPT-2 case.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoHaConfig, LoKrConfig

import weightsteer
from conftest import make_adapter


def test_loha_rank_pattern_disagreeing_with_tensors_is_refused(bases, tmp_path):
    adapter = make_adapter(bases("llama"), tmp_path / "a", LoHaConfig(r=4, target_modules=["q_proj", "v_proj"]))
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["rank_pattern"] = {"v_proj": 2}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    expected = r"v_proj: hada_w1_b has rank 4 but adapter_config.json gives r = 2"
    with pytest.raises(weightsteer.AdapterError, match=expected):
        weightsteer.merge(adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_loha_conv_base_is_refused():
    from weightsteer.adapters.base import ShapeLookup
    from weightsteer.adapters.loha import FACTORS, LoHa

    shapes = {"hada_w1_a": (8, 4), "hada_w1_b": (4, 36), "hada_w2_a": (8, 4), "hada_w2_b": (4, 36)}
    tensors = {f"base_model.model.conv.{name}": torch.ones(shapes[name]) for name in FACTORS}
    (state,) = LoHa().parse({"r": 4, "alpha": 4}, tensors, ShapeLookup({}), {})
    with pytest.raises(weightsteer.UnsupportedAdapterError, match="Linear and Conv1D layers"):
        LoHa().check_shapes(state, (8, 4, 3, 3), None)


def test_lokr_rank_pattern_disagreeing_with_tensors_is_refused(bases, tmp_path):
    config = LoKrConfig(r=2, decompose_both=True, target_modules=["q_proj"])
    adapter = make_adapter(bases("llama"), tmp_path / "a", config)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["rank_pattern"] = {"q_proj": 3}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    expected = r"q_proj: lokr_w1_b has rank 2 but adapter_config.json gives r = 3"
    with pytest.raises(weightsteer.AdapterError, match=expected):
        weightsteer.merge(adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()

"""FourierFT edge case: n_frequency disagreeing with the stored spectrum. The runtime-match rows (positions
re-derived from the seed, n_frequency_pattern, Llama, Qwen2 biases, GPT-2 Conv1D, every scheme) are in tests/cases.py."""

from __future__ import annotations

import json

import pytest
from peft import FourierFTConfig

import weightsteer
from conftest import make_adapter


def test_n_frequency_disagreeing_with_spectrum_is_refused(bases, tmp_path):
    adapter = make_adapter(bases("llama"), tmp_path / "a", FourierFTConfig(n_frequency=100, target_modules=["q_proj"]))
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["n_frequency_pattern"] = {"q_proj": 50}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    expected = r"q_proj stores 100 frequencies but adapter_config.json gives n_frequency = 50"
    with pytest.raises(weightsteer.AdapterError, match=expected):
        weightsteer.merge(adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()

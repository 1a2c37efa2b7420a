"""MiSS edge cases: old Bone checkpoints, refusals. The runtime-match rows (default, r not dividing in (zero
padding), "mini", "bat" (ΔW depends on W), Llama and Qwen2 biases) are in tests/cases.py."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import MissConfig
from safetensors.torch import load_file, save_file

import weightsteer
from cases import COEFFS, ROWS
from conftest import ATOL, make_adapter, model_logits, runtime_logits

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


@pytest.mark.parametrize("variant", ["default", "padded", "bat"])
def test_bone_checkpoint_merges_as_miss(bases, tmp_path, variant):
    """PEFT 0.21.2 has no Bone: a MiSS checkpoint renamed to Bone's keys and type must merge to what
    PEFT's MiSS computes."""
    miss = ROWS[f"miss-{variant}-llama"].adapter(bases("llama"), tmp_path / "miss")
    bone = _as_bone(miss, tmp_path / "bone")
    base_logits = model_logits(bases("llama"))
    weightsteer.merge_many(bone, {c: tmp_path / f"c{c:g}" for c in COEFFS})  # one read of the base for every coeff
    for c in COEFFS:
        expected = runtime_logits(bases("llama"), miss, c)
        assert (model_logits(tmp_path / f"c{c:g}") - expected).abs().max() <= ATOL, f"coeff {c}"
        assert c == 0 or (expected - base_logits).abs().max() > 10 * ATOL


def test_config_not_matching_block_is_refused(bases, tmp_path):
    adapter = make_adapter(bases("llama"), tmp_path / "a", MissConfig(r=8, target_modules=["q_proj"]))
    config = json.loads((adapter / CONFIG).read_text())
    config["init_weights"] = "bat"
    (adapter / CONFIG).write_text(json.dumps(config))
    with pytest.raises(weightsteer.AdapterError, match=r"init_weights='bat' needs a 3-D block"):
        weightsteer.merge(adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_wrong_block_width_is_refused(bases, tmp_path):
    adapter = make_adapter(bases("llama"), tmp_path / "a", MissConfig(r=8, target_modules=["k_proj"]))
    tensors = load_file(adapter / WEIGHTS)
    key = next(k for k in tensors if k.endswith("layers.0.self_attn.k_proj.miss_block"))
    tensors[key] = torch.cat([tensors[key], tensors[key]], dim=1)
    save_file(tensors, adapter / WEIGHTS)
    with pytest.raises(weightsteer.AdapterError, match=r"layers\.0\.self_attn\.k_proj: output features"):
        weightsteer.merge(adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _as_bone(miss, folder):
    shutil.copytree(miss, folder)
    tensors = load_file(folder / WEIGHTS)
    save_file({k.replace("miss_block", "bone_block"): v for k, v in tensors.items()}, folder / WEIGHTS)
    config = json.loads((folder / CONFIG).read_text())
    config["peft_type"] = "BONE"
    (folder / CONFIG).write_text(json.dumps(config))
    return folder

"""Adapter types that are not weight changes are refused clearly; `inspect` describes any adapter."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from peft import (
    AdaptionPromptConfig,
    LoraConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    get_peft_model,
)

from conftest import load_base, make_adapter
from weightsteer.cli import main


def _saved(bases, folder, config):
    model = get_peft_model(load_base(bases("llama")), config)
    model.save_pretrained(folder)
    data = json.loads((folder / "adapter_config.json").read_text())
    data["base_model_name_or_path"] = str(bases("llama"))
    (folder / "adapter_config.json").write_text(json.dumps(data))
    return folder


def _hand_written(folder, peft_type):
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type, "base_model_name_or_path": "x"}))
    return folder


CASES = {
    "prompt tuning": (lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), "virtual tokens"),
    "p-tuning": (lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16), "virtual tokens"),
    "prefix tuning": (lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), "keys and values"),
    "adaption prompt": (lambda: AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=2, adapter_layers=1), "query"),
}


@pytest.mark.parametrize("case", CASES)
def test_non_weight_adapters_are_refused(bases, tmp_path, case):
    make_config, reason = CASES[case]
    adapter = _saved(bases, tmp_path / "a", make_config())
    result = CliRunner().invoke(main, ["merge", str(adapter), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert reason in result.output and "Cannot merge" in result.output
    assert not (tmp_path / "out").exists()
    assert [p for p in tmp_path.iterdir() if "weightsteer" in p.name] == []


@pytest.mark.parametrize(
    ("peft_type", "reason"),
    [("XLORA", "per token"), ("MULTITASK_PROMPT_TUNING", "virtual tokens"), ("CPT", "virtual tokens")],
)
def test_hand_written_refusals(tmp_path, peft_type, reason):
    adapter = _hand_written(tmp_path / "a", peft_type)
    result = CliRunner().invoke(main, ["merge", str(adapter), "-o", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 1
    assert reason in json.loads(result.output)["error"]
    assert not (tmp_path / "out").exists()


def test_inspect_lora_with_base(bases, tmp_path):
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2})
    adapter = make_adapter(bases("llama"), tmp_path / "a", config)
    result = CliRunner().invoke(main, ["inspect", str(adapter), "--base", str(bases("llama")), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["adapter_type"] == "LORA" and report["merge"] == "exact"
    assert report["rank"] == 4 and report["rank_pattern"] == {"v_proj": 2}
    assert len(report["targets"]) == 4 and report["scheme"]["name"] == "linear"
    assert len(report["changes"]) == 4 and all(c["relative_change"] > 0 for c in report["changes"])
    table = CliRunner().invoke(main, ["inspect", str(adapter), "--base", str(bases("llama"))])
    assert "‖ΔW‖/‖W‖" in table.output and "model.layers.1.self_attn.v_proj.weight" in table.output


def test_inspect_refused_type_explains(bases, tmp_path):
    adapter = _saved(bases, tmp_path / "a", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    result = CliRunner().invoke(main, ["inspect", str(adapter)])
    assert result.exit_code == 0
    assert "refused" in result.output and "virtual tokens" in result.output


@pytest.mark.parametrize("name", ["honesty.gguf", "w.pt", "adapter.safetensors"])
def test_a_missing_file_is_not_looked_up_on_the_hub(tmp_path, monkeypatch, name):
    """A mistyped file name is one line about the file, not a Hub download error (repo ids may hold dots too)."""
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["merge", name, "-o", "out"])
    assert result.exit_code == 1
    assert f"'{name}': no such file or folder" in result.output and "Hub" not in result.output
    assert not (tmp_path / "out").exists()

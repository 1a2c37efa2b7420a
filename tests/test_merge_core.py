"""The merge engine itself: output layout, byte-identical files, one read for several coeffs,
numerics reporting, and every bad input refused with a clear message and nothing written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import weightsteer
from weightsteer.checkpoint import read_header
from weightsteer.cli import main
from conftest import make_adapter, model_logits, runtime_logits

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture
def lora(bases, tmp_path):
    return make_adapter(bases("llama:sharded"), tmp_path / "adapter", LoraConfig(r=4, target_modules=TARGETS))


def _no_leftovers(folder):
    return [p.name for p in folder.iterdir() if ".weightsteer-" in p.name] == []


def test_sharded_layout_is_preserved(bases, lora, tmp_path):
    base = bases("llama:sharded")
    out = weightsteer.merge(lora, tmp_path / "out", coeff=0.5)
    base_index = json.loads((base / "model.safetensors.index.json").read_text())
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(base_index["weight_map"].values())) > 1, "fixture must be sharded"
    assert index["weight_map"] == base_index["weight_map"]
    assert index["metadata"]["total_size"] == base_index["metadata"]["total_size"]
    for shard in set(index["weight_map"].values()):
        ours, theirs = read_header(out / shard), read_header(base / shard)
        assert [(t.name, t.dtype, t.shape) for t in ours[1]] == [(t.name, t.dtype, t.shape) for t in theirs[1]]
        assert ours[0]["format"] == "pt"
    for name in ("config.json", "generation_config.json", "tokenizer.json", "LICENSE"):
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    assert _no_leftovers(tmp_path)


def test_untouched_tensors_are_byte_identical_and_touched_ones_change(bases, lora, tmp_path):
    base = bases("llama:sharded")
    out = weightsteer.merge(lora, tmp_path / "out", coeff=1)
    ours = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
    theirs = {k: v for f in base.glob("*.safetensors") for k, v in load_file(f).items()}
    changed = {k for k in theirs if not torch.equal(ours[k], theirs[k])}
    assert changed == {k for k in theirs if any(f"{t}.weight" in k for t in TARGETS)}


def test_several_coeffs_from_one_read_via_cli(bases, lora, tmp_path):
    result = CliRunner().invoke(main, ["merge", str(lora), "--coeff", "-1", "--coeff", "1", "-o", str(tmp_path / "m"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert [r["coeff"] for r in report] == [-1, 1]
    for c in (-1, 1):
        merged = model_logits(tmp_path / f"m-c{c}")
        assert (merged - runtime_logits(bases("llama:sharded"), lora, c)).abs().max() < 1e-4
        assert json.loads((tmp_path / f"m-c{c}" / "weightsteer.json").read_text())["coeff"] == c


def test_existing_output_is_refused_unless_overwrite(lora, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(weightsteer.OutputError, match="overwrite=True"):
        weightsteer.merge(lora, out)
    with pytest.raises(weightsteer.OutputError, match="not a weightsteer output"):
        weightsteer.merge(lora, out, overwrite=True)  # not a folder weightsteer wrote: never deleted
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    weightsteer.merge(lora, out, overwrite=True)  # empty: replaced
    weightsteer.merge(lora, out, coeff=0.5, overwrite=True)  # written by weightsteer: replaced
    assert json.loads((out / "weightsteer.json").read_text())["coeff"] == 0.5
    assert _no_leftovers(tmp_path)


def test_cli_error_exit_code_and_message(lora, tmp_path):
    (tmp_path / "out").mkdir()
    result = CliRunner().invoke(main, ["merge", str(lora), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "exists already" in result.output


@pytest.mark.parametrize("coeff", [float("nan"), float("inf")])
def test_non_finite_coeff(lora, tmp_path, coeff):
    with pytest.raises(weightsteer.SchemeError, match="finite"):
        weightsteer.merge(lora, tmp_path / "out", coeff=coeff)
    assert not (tmp_path / "out").exists()


def test_non_finite_adapter_values(lora, tmp_path):
    path = lora / "adapter_model.safetensors"
    tensors = load_file(path)
    name = next(iter(tensors))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, path)
    with pytest.raises(weightsteer.AdapterError, match="NaN"):
        weightsteer.merge(lora, tmp_path / "out")


def test_identity_adapter_changes_nothing(bases, tmp_path):
    from peft import get_peft_model

    from conftest import load_base

    model = get_peft_model(load_base(bases("llama")), LoraConfig(r=4, target_modules=TARGETS))
    model.save_pretrained(tmp_path / "untrained")  # B = 0: a no-op
    with pytest.raises(weightsteer.AdapterError, match="changes no tensor"):
        weightsteer.merge(tmp_path / "untrained", tmp_path / "out", base=bases("llama"))
    assert not (tmp_path / "out").exists() and _no_leftovers(tmp_path)


def test_unknown_adapter_type(lora, tmp_path):
    config = json.loads((lora / "adapter_config.json").read_text())
    config["peft_type"] = "SOMETHING_NEW"
    (lora / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(weightsteer.UnsupportedAdapterError, match="SOMETHING_NEW"):
        weightsteer.merge(lora, tmp_path / "out")


def test_adapter_for_another_model(bases, tmp_path):
    adapter = make_adapter(bases("llama"), tmp_path / "a", LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(weightsteer.AdapterError, match=r"model\.layers\.0\.self_attn\.q_proj.*no tensor"):
        weightsteer.merge(adapter, tmp_path / "out", base=bases("gpt2"))
    assert not (tmp_path / "out").exists()


def test_shape_mismatch_names_module_and_shapes(bases, tmp_path):
    adapter = make_adapter(bases("llama"), tmp_path / "a", LoraConfig(r=4, target_modules=["q_proj"]))
    other = tmp_path / "other"
    shutil.copytree(bases("llama"), other)
    tensors = load_file(other / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(32, 64)
    save_file(tensors, other / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(weightsteer.AdapterError, match=r"q_proj.*\(64, 64\).*\(32, 64\)"):
        weightsteer.merge(adapter, tmp_path / "out", base=other)


def test_pickle_only_base_is_refused(bases, lora, tmp_path):
    base = tmp_path / "pickled"
    shutil.copytree(bases("llama"), base)
    state = load_file(base / "model.safetensors")
    (base / "model.safetensors").unlink()
    torch.save(state, base / "pytorch_model.bin")
    with pytest.raises(weightsteer.BaseModelError, match="safetensors only"):
        weightsteer.merge(lora, tmp_path / "out", base=base)


def test_quantized_base_is_refused(bases, lora, tmp_path):
    base = tmp_path / "quantized"
    shutil.copytree(bases("llama"), base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(weightsteer.BaseModelError, match="quantized.*bitsandbytes"):
        weightsteer.merge(lora, tmp_path / "out", base=base)


def test_bf16_rounding_is_reported(bases, tmp_path):
    base = bases("llama:bf16")
    adapter = make_adapter(base, tmp_path / "a", LoraConfig(r=4, target_modules=TARGETS), scale=0.02)
    big, small = weightsteer.merge_many(adapter, {1.0: tmp_path / "big", 0.01: tmp_path / "small"})
    assert big.rounding.swallowed_share < small.rounding.swallowed_share
    assert small.rounding.swallowed_share > 0.25 and any("rounded back" in w for w in small.warnings)
    with safe_open(tmp_path / "big" / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.bfloat16


def test_dtype_override_converts_and_patches_config(bases, lora, tmp_path):
    out = weightsteer.merge(lora, tmp_path / "out", dtype="float16")
    for f in out.glob("*.safetensors"):
        assert {t.dtype for t in read_header(f)[1]} == {"F16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    expected = runtime_logits(bases("llama:sharded"), lora, 1)
    assert (model_logits(out) - expected).abs().max() < 2e-2  # fp16 weights vs fp32 runtime


def test_task_id_is_refused_for_non_poly(lora, tmp_path):
    with pytest.raises(weightsteer.SchemeError, match="--task-id applies to Poly"):
        weightsteer.merge(lora, tmp_path / "out", task_id=1)
    assert not (tmp_path / "out").exists()


def test_hub_repo_ids_resolve_from_the_cache_offline(bases, lora, tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = cache / "models--org--tiny-llama" / "snapshots" / commit
    shutil.copytree(bases("llama:sharded"), snapshot)
    (cache / "models--org--tiny-llama" / "refs").mkdir()
    (cache / "models--org--tiny-llama" / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    out = weightsteer.merge(lora, tmp_path / "out", base="org/tiny-llama")
    assert (model_logits(out) - runtime_logits(bases("llama:sharded"), lora, 1)).abs().max() < 1e-4
    with pytest.raises(weightsteer.BaseModelError, match="org/not-cached.*Offline, only repos already in the cache"):
        weightsteer.merge(lora, tmp_path / "out2", base="org/not-cached")
    assert not (tmp_path / "out2").exists()

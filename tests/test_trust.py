"""Issue 8: weightsteer never destroys a user's files, never publishes a broken model, never prints a secret,
and answers every bad input with one clear line. (Kills, full disks and concurrent runs: test_faults.py;
random malformed inputs: test_fuzz.py.)"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from peft import LoraConfig
from safetensors.torch import load_file, save_file

import weightsteer
from conftest import assert_matches_runtime, load_base, make_adapter
from test_verify import tamper
from weightsteer.cli import main
from weightsteer.errors import redact
from weightsteer.export import export_lora
from weightsteer.outputs import OutputSlot

TARGETS = ["q_proj", "v_proj"]
Q = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def made(tmp_path_factory, bases):
    """A base and a LoRA trained on it, built once; tests work on copies (see `inputs`)."""
    root = tmp_path_factory.mktemp("made")
    base = root / "base"
    shutil.copytree(bases("llama"), base)
    adapter = make_adapter(base, root / "adapter", LoraConfig(r=4, target_modules=TARGETS))
    return base, adapter


@pytest.fixture
def inputs(made, tmp_path):
    """Fresh copies: (base, adapter), the adapter's config pointing at this base."""
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    shutil.copytree(made[0], base)
    shutil.copytree(made[1], adapter)
    _edit_json(adapter / "adapter_config.json", lambda c: c | {"base_model_name_or_path": str(base)})
    return base, adapter


def _edit_json(path: Path, change) -> None:
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def fingerprint(folder: Path) -> dict[str, str]:
    """Every file under folder (links as their target) → its sha256: "untouched" means this is unchanged."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(folder.rglob("*"))
    }


def cli(*args) -> "CliRunner.Result":
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


def one_line_error(result) -> str:
    """The refusal: exit code 1 and a single `error:` line (no traceback)."""
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def rewrite_header(path: Path, change) -> None:
    """Replace a safetensors file's JSON header by change(header) (data offsets are relative: data stays valid)."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = change(json.loads(data[8 : 8 + length]))
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + length :])


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# ---- data loss -----------------------------------------------------------------------------------------


def test_overwrite_never_deletes_a_folder_weightsteer_did_not_write(inputs, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "thesis.txt").write_text("four years of work")
    (docs / "figures").mkdir()
    (docs / "figures" / "plot.png").write_bytes(b"png")
    line = one_line_error(cli("merge", inputs[1], "-o", docs, "--overwrite"))
    assert "not a weightsteer output (2 files such as thesis.txt" in line and "--overwrite replaces only" in line
    assert (docs / "thesis.txt").read_text() == "four years of work" and (docs / "figures" / "plot.png").exists()
    with pytest.raises(weightsteer.OutputError, match="overwrite=True replaces only"):
        export_lora(inputs[1], docs, overwrite=True)
    assert (docs / "thesis.txt").exists()


@pytest.mark.parametrize("where", ["base", "adapter", "parent of base", "inside base", "inside adapter"])
def test_outputs_overlapping_the_inputs_are_refused_even_with_overwrite(inputs, tmp_path, where):
    base, adapter = inputs
    output = {
        "base": base,
        "adapter": adapter,
        "parent of base": tmp_path,
        "inside base": base / "merged",
        "inside adapter": adapter / "merged",
    }[where]
    if output.exists():  # e.g. a merged model used as a base: "written by weightsteer", still never replaced
        (output / "weightsteer.json").write_text("{}")
    before = fingerprint(tmp_path)
    line = one_line_error(cli("merge", adapter, "-o", output, "--overwrite"))
    assert ("is or contains the" in line) or ("lies inside the" in line), line
    assert fingerprint(tmp_path) == before


def test_exists_already_names_the_flag_in_the_cli_and_the_argument_in_the_api(inputs, tmp_path):
    out = weightsteer.merge(inputs[1], tmp_path / "out")
    line = one_line_error(cli("merge", inputs[1], "-o", out))
    assert "exists already; pass --overwrite" in line and "overwrite=True" not in line
    with pytest.raises(weightsteer.OutputError, match=r"exists already; pass overwrite=True"):
        weightsteer.merge(inputs[1], out)
    assert cli("merge", inputs[1], "-o", out, "--overwrite", "-c", "0.5", "-q").exit_code == 0  # ours: replaced
    assert json.loads((out / "weightsteer.json").read_text())["coeff"] == 0.5


def test_leftovers_of_dead_runs_are_removed_and_reported(inputs, tmp_path):
    dead, alive = _dead_pid(), os.getpid()
    leftover = tmp_path / f".out.weightsteer-{dead}-abcd"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"x" * 5000)
    other = tmp_path / f".out.weightsteer-{alive}-efgh"  # a live process's: not ours to remove
    other.mkdir()
    result = cli("merge", inputs[1], "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert not leftover.exists() and other.exists()
    assert f"removed 1 unfinished output folder of out left by killed weightsteer runs (pid {dead}), freeing 5.0 KB" in result.stderr


def test_a_held_lock_refuses_a_second_writer_naming_its_pid(tmp_path):
    with OutputSlot(tmp_path / "out", overwrite=False):
        with pytest.raises(weightsteer.OutputError, match=rf"Another weightsteer process \(pid {os.getpid()}\) is writing"):
            OutputSlot(tmp_path / "out", overwrite=False).__enter__()
    assert not list(tmp_path.iterdir())  # the lock file goes with the lock


def test_publish_never_replaces_an_output_that_appeared_meanwhile(tmp_path):
    with OutputSlot(tmp_path / "out", overwrite=False) as slot:
        (slot.stage() / "weights").write_text("new")
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "theirs.txt").write_text("theirs")
        with pytest.raises(weightsteer.OutputError, match="appeared while this run was writing"):
            slot.publish()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["theirs.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_coeff_names_are_unique_and_read_back_exactly(inputs, tmp_path):
    result = cli("merge", inputs[1], "-c", "0.1", "-c", "0.1000001", "-o", tmp_path / "n", "--json")
    assert result.exit_code == 0, result.output
    for name, coeff in (("n-c0.1", 0.1), ("n-c0.1000001", 0.1000001)):
        assert json.loads((tmp_path / name / "weightsteer.json").read_text())["coeff"] == coeff
        assert float(name.removeprefix("n-c")) == coeff
    assert cli("merge", inputs[1], "-c", "-1", "-c", "2", "-o", tmp_path / "m{coeff}x", "-q").exit_code == 0
    assert (tmp_path / "m-1x").is_dir() and (tmp_path / "m2x").is_dir()


@pytest.mark.parametrize("output", ["x{coeff}{y}", "x{coeff", "x{coeff:.2f}"])
def test_bad_output_templates_are_usage_errors(inputs, tmp_path, output):
    result = cli("merge", inputs[1], "-c", "1", "-c", "2", "-o", tmp_path / output)
    assert result.exit_code == 2 and "{coeff}" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]


def test_output_dot_is_refused(inputs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "current folder" in one_line_error(cli("merge", inputs[1], "-o", ".", "--overwrite"))


# ---- silent wrong output -------------------------------------------------------------------------------


@pytest.mark.parametrize("tensor", [Q, "model.layers.1.mlp.up_proj.weight"])  # adapted, and untouched
def test_verify_fails_on_nan_anywhere(inputs, tmp_path, tensor):
    out = weightsteer.merge(inputs[1], tmp_path / "out")
    tamper(out, tensor, lambda w: torch.full_like(w, float("nan")))
    report = weightsteer.verify(out)
    assert not report.ok and report.nonfinite == {tensor: 64 * (64 if "q_proj" in tensor else 128)}
    assert f"{tensor}: {report.nonfinite[tensor]} values are NaN or inf" in report.failures


def test_float16_overflow_is_refused_naming_tensor_and_value(inputs, tmp_path):
    with pytest.raises(weightsteer.OutputError, match=r"overflows F16: \d+ values become inf, e\.g\. in model\..*largest value is .*dtype='bfloat16'"):
        weightsteer.merge(inputs[1], tmp_path / "out", coeff=1e6, dtype="float16")
    line = one_line_error(cli("merge", inputs[1], "-o", tmp_path / "out", "-c", "1e6", "--dtype", "float16"))
    assert "use --dtype bfloat16 (or float32)" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]


def test_overflow_is_counted_by_the_rounding_report():
    from weightsteer.engine import RoundingReport

    report = RoundingReport()
    report.add_overflow("w", 3, 1e5)
    report.add_overflow("v", 2, 2e5)
    assert report.overflowed == 5 and report.overflow_tensor == "w" and "5 values overflowed" in report.summary("F16")


def test_fan_in_fan_out_set_on_a_linear_model_follows_peft(inputs, tmp_path):
    """PEFT ignores (and resets) the flag for nn.Linear; a square q_proj hides a transposed change from shape checks."""
    base, adapter = inputs
    _edit_json(adapter / "adapter_config.json", lambda c: c | {"fan_in_fan_out": True, "target_modules": ["q_proj"]})
    tensors = load_file(adapter / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if "q_proj" in k}, adapter / "adapter_model.safetensors")
    (tmp_path / "runs").mkdir()
    assert_matches_runtime(base, adapter, tmp_path / "runs", coeffs=(1,))


def test_base_metadata_that_safetensors_cannot_load_is_refused(inputs, tmp_path):
    base, adapter = inputs
    rewrite_header(base / "model.safetensors", lambda h: h | {"__metadata__": {"format": "pt", "n": 5}})
    line = one_line_error(cli("merge", adapter, "-o", tmp_path / "out"))
    assert "__metadata__['n'] is 5, not a string" in line
    assert not (tmp_path / "out").exists()


def test_links_leaving_the_base_are_refused_by_name(inputs, tmp_path, monkeypatch):
    base, adapter = inputs
    secret = tmp_path / "private.txt"
    secret.write_text("not for the Hub")
    (base / "notes.txt").symlink_to(secret)
    monkeypatch.setattr(sys.modules["weightsteer.merge"], "stream", lambda *a, **k: pytest.fail("the base was streamed"))
    line = one_line_error(cli("merge", adapter, "-o", tmp_path / "out"))
    assert "notes.txt links to" in line and "outside the model folder" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["dangling", "loop"])
def test_broken_links_in_the_base_are_refused(inputs, tmp_path, kind):
    base, adapter = inputs
    if kind == "dangling":
        (base / "vocab.txt").symlink_to(base / "missing.txt")
    else:
        (base / "a.txt").symlink_to(base / "b.txt")
        (base / "b.txt").symlink_to(base / "a.txt")
    assert "is a broken link" in one_line_error(cli("merge", adapter, "-o", tmp_path / "out"))


def test_hub_cache_links_into_blobs_are_followed(inputs, tmp_path, monkeypatch):
    """A Hub-cache snapshot is links into ../../blobs; they are the model's own files. The card then links the base."""
    base, adapter = inputs
    repo = tmp_path / "hub" / "models--org--tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / commit).mkdir(parents=True)
    for file in base.iterdir():
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blob)
        (repo / "snapshots" / commit / file.name).symlink_to(Path("../../blobs") / blob.name)
    out = weightsteer.merge(adapter, tmp_path / "out", base=repo / "snapshots" / commit)
    provenance = json.loads((out / "weightsteer.json").read_text())
    assert provenance["base_model"] == "org/tiny" and provenance["base_revision"] == commit
    assert "base_model: org/tiny" in (out / "README.md").read_text()
    assert (out / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()


def test_coeff_too_small_says_so(inputs, tmp_path):
    with pytest.raises(weightsteer.AdapterError, match="smaller than what float32 .* can represent"):
        weightsteer.merge(inputs[1], tmp_path / "out", coeff=1e-12)


def test_zero_adapter_is_refused_before_the_base_is_streamed(inputs, tmp_path, monkeypatch):
    from peft import get_peft_model

    merge_module = sys.modules["weightsteer.merge"]  # the package's `merge` attribute is the function
    base = inputs[0]
    get_peft_model(load_base(base), LoraConfig(r=4, target_modules=TARGETS)).save_pretrained(tmp_path / "untrained")
    monkeypatch.setattr(merge_module, "stream", lambda *a, **k: pytest.fail("the base was streamed"))
    with pytest.raises(weightsteer.AdapterError, match="changes no tensor.*initialisation"):
        weightsteer.merge(tmp_path / "untrained", tmp_path / "out", base=base)


# ---- secrets -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "401 {'Authorization': 'Bearer s3cr3t-value', 'Accept': '*/*'}",
        '{"authorization": "Bearer s3cr3t-value"}',
        "headers: Authorization: Bearer s3cr3t-value\r\nHost: x",
        "token hf_abcdefghijklmnopqrstuvwxyz0123 in a URL",
    ],
)
def test_redaction_removes_authorization_values_and_hub_tokens(text):
    assert "s3cr3t" not in redact(text) and "hf_abcdefghijkl" not in redact(text)
    assert "***" in redact(text)


def test_errors_are_redacted_on_construction(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "tok-1234567890")
    assert "tok-1234567890" not in str(weightsteer.PushError("server said: token tok-1234567890 invalid"))


# ---- cards and weightsteer.json ------------------------------------------------------------------------


def test_no_local_paths_are_published_and_verify_works_from_elsewhere(inputs, tmp_path, monkeypatch):
    base, adapter = inputs
    monkeypatch.chdir(tmp_path)
    result = cli("merge", "adapter", "--base", "base", "-o", "out")  # relative, as typed
    assert result.exit_code == 0, result.output
    assert "its card has no base_model link" in result.stdout and "--base-id" in result.stdout
    out = tmp_path / "out"
    for name in ("README.md", "weightsteer.json"):
        assert str(tmp_path) not in (out / name).read_text(), name
    assert "Not verified yet" in (out / "README.md").read_text()
    monkeypatch.chdir(base)  # another folder: "adapter" would now be a Hub repo id
    assert cli("verify", out).exit_code == 0
    card = (out / "README.md").read_text()
    assert "Not verified yet" not in card and "**passed**" in card and str(tmp_path) not in card
    assert str(tmp_path) not in (out / "weightsteer.json").read_text()


def test_base_id_sets_the_card_link(inputs, tmp_path):
    result = cli("merge", inputs[1], "-o", tmp_path / "out", "--base-id", "org/tiny-llama")
    assert result.exit_code == 0 and "no base_model link" not in result.stdout
    assert "base_model: org/tiny-llama" in (tmp_path / "out" / "README.md").read_text()


def test_verify_failure_says_what_came_from_weightsteer_json(inputs, tmp_path):
    out = weightsteer.merge(inputs[1], tmp_path / "out", coeff=0.5)
    tamper(out, Q, lambda w: w * 1.01)
    result = cli("verify", out)
    assert result.exit_code == 1
    assert "adapter and coeff as recorded in weightsteer.json, coeff 0.5" in result.stderr and "--adapter / --coeff" in result.stderr


# ---- bad inputs: one line, nothing written -------------------------------------------------------------


def _shard(base):
    return base / "model.safetensors"


def _header_length(base, length):
    data = _shard(base).read_bytes()
    _shard(base).write_bytes(struct.pack("<Q", length) + data[8:])


BAD_INPUTS = {
    "header length 2^63": (lambda b, a: _header_length(b, 2**63), "header claims"),
    "header length 2^36": (lambda b, a: _header_length(b, 2**36), "header claims"),
    "missing dtype": (lambda b, a: rewrite_header(_shard(b), lambda h: h | {Q: {k: v for k, v in h[Q].items() if k != "dtype"}}), "dtype"),
    "missing data_offsets": (lambda b, a: rewrite_header(_shard(b), lambda h: h | {Q: {k: v for k, v in h[Q].items() if k != "data_offsets"}}), "data_offsets"),
    "mistyped data_offsets": (lambda b, a: rewrite_header(_shard(b), lambda h: h | {Q: h[Q] | {"data_offsets": "0-10"}}), "data_offsets"),
    "index without weight_map": (lambda b, a: (b / "model.safetensors.index.json").write_text('{"metadata": {}}'), "weight_map"),
    "config.json a list": (lambda b, a: (b / "config.json").write_text("[1, 2]"), "JSON array, not an object"),
    "config.json null": (lambda b, a: (b / "config.json").write_text("null"), "JSON null, not an object"),
    "quantization_config a list": (lambda b, a: _edit_json(b / "config.json", lambda c: c | {"quantization_config": [4]}), "quantized"),
    "adapter_config a bare number": (lambda b, a: (a / "adapter_config.json").write_text("5"), "not an object"),
    "lora_alpha a string": (lambda b, a: _edit_json(a / "adapter_config.json", lambda c: c | {"lora_alpha": "16"}), "lora_alpha"),
    "peft_type a list": (lambda b, a: _edit_json(a / "adapter_config.json", lambda c: c | {"peft_type": ["LORA"]}), "peft_type"),
    "rank mismatch": (lambda b, a: _retensor(a, lambda k, t: t[:2] if "q_proj.lora_A" in k else t), "ranks"),
    "config r differs from the tensors": (lambda b, a: _edit_json(a / "adapter_config.json", lambda c: c | {"r": 3}), "r = 3"),
    "empty adapter file": (lambda b, a: (a / "adapter_model.safetensors").write_bytes(b""), "cannot be read"),
    "corrupt adapter file": (lambda b, a: (a / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!!}"), "cannot be read"),
}


def _retensor(adapter, change) -> None:
    tensors = load_file(adapter / "adapter_model.safetensors")
    save_file({k: change(k, t).contiguous() for k, t in tensors.items()}, adapter / "adapter_model.safetensors")


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_get_one_line_and_nothing_is_written(inputs, tmp_path, case):
    base, adapter = inputs
    if "index" in case:  # a sharded base: transformers (and weightsteer) read the index only without model.safetensors
        shard = _shard(base).rename(base / "model-00001-of-00001.safetensors")
        index = {"metadata": {}, "weight_map": {n: shard.name for n in load_file(shard)}}
        (base / "model.safetensors.index.json").write_text(json.dumps(index))
    damage, expected = BAD_INPUTS[case]
    damage(base, adapter)
    before = fingerprint(tmp_path)
    line = one_line_error(cli("merge", adapter, "-o", tmp_path / "out"))
    assert expected in line, line
    assert fingerprint(tmp_path) == before


@pytest.mark.parametrize("r", [3, 10**8])
def test_verify_with_a_config_r_that_does_not_match(inputs, tmp_path, r):
    out = weightsteer.merge(inputs[1], tmp_path / "out")
    _edit_json(inputs[1] / "adapter_config.json", lambda c: c | {"r": r})
    line = one_line_error(cli("verify", out))
    assert f"r = {r}" in line and "recorded in" in line


@pytest.mark.parametrize("device, expected", [("banana", "Unknown device 'banana'"), ("cuda", "not available"), ("cuda:7", "")])
def test_unusable_devices_are_refused(inputs, tmp_path, device, expected):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    line = one_line_error(cli("merge", inputs[1], "-o", tmp_path / "out", "--device", device))
    assert expected in line
    assert not (tmp_path / "out").exists()


def test_scaled_refuses_a_plain_model_and_an_unknown_adapter(inputs):
    from peft import PeftModel

    with pytest.raises(weightsteer.AdapterError, match="needs a PEFT model"):
        with weightsteer.scaled(load_base(inputs[0]), 0.5):
            pass
    model = PeftModel.from_pretrained(load_base(inputs[0]), inputs[1])
    with pytest.raises(weightsteer.AdapterError, match="no adapter named 'other'.*'default'"):
        with weightsteer.scaled(model, 0.5, adapter="other"):
            pass


def test_gguf_overwrite_replaces_only_a_gguf_file(inputs, tmp_path):
    from weightsteer.llamacpp import convert_model

    out = weightsteer.merge(inputs[1], tmp_path / "out")
    notes = tmp_path / "notes.gguf"
    notes.write_text("my notes")
    with pytest.raises(weightsteer.OutputError, match="not a GGUF file"):
        convert_model(out, notes, overwrite=True)
    with pytest.raises(weightsteer.OutputError, match="lies inside the model folder"):
        convert_model(out, out / "model.gguf")
    assert notes.read_text() == "my notes"


def test_inspect_reads_the_config_through_the_same_checks(inputs):
    (inputs[1] / "adapter_config.json").write_text("5")
    assert "JSON number, not an object" in one_line_error(cli("inspect", inputs[1]))


# ---- compositions and recipes: the same guarantees for every output ------------------------------------


@pytest.fixture
def two(inputs, made, tmp_path):
    """(base, adapter a, adapter b): b a second LoRA on the same base (built once per module, copied here)."""
    built = made[0].parent / "b"
    if not built.exists():
        make_adapter(made[0], built, LoraConfig(r=2, target_modules=["v_proj", "up_proj"]), seed=2)
    b = tmp_path / "b"
    shutil.copytree(built, b)
    _edit_json(b / "adapter_config.json", lambda c: c | {"base_model_name_or_path": str(inputs[0])})
    return (*inputs, b)


@pytest.mark.parametrize("where", ["second adapter", "inside second adapter"])
def test_overwrite_refuses_an_output_overlapping_any_term_of_a_composition(two, tmp_path, where):
    base, a, b = two
    output = b if where == "second adapter" else b / "merged"
    if output.exists():
        (output / "weightsteer.json").write_text("{}")  # "written by weightsteer": still never replaced
    before = fingerprint(tmp_path)
    line = one_line_error(cli("merge", f"{a}@1", f"{b}@1", "-o", output, "--overwrite"))
    assert f"is or contains the adapter {b};" in line or f"lies inside the adapter folder {b};" in line, line
    assert fingerprint(tmp_path) == before
    with pytest.raises(weightsteer.OutputError, match=f"inside the adapter folder {b};|not a weightsteer output"):  # export-lora too
        export_lora([weightsteer.Steer(a, 1.0), weightsteer.Steer(b, 1.0)], output, overwrite=True)
    assert fingerprint(tmp_path) == before


def test_a_recipe_whose_outputs_collide_is_refused_before_any_work(two, tmp_path, monkeypatch):
    base, a, b = two
    merge_module = sys.modules["weightsteer.merge"]
    monkeypatch.setattr(merge_module, "open_plan", lambda *a, **k: pytest.fail("work started"))
    terms = [{"adapter": str(a), "coeff": 0.5}, {"adapter": str(b), "coeff": -1}]
    same = {"outputs": [{"path": str(tmp_path / "out"), "adapters": terms}, {"path": f"{tmp_path}/x/../out", "adapters": terms[:1]}]}
    with pytest.raises(weightsteer.RecipeError, match="outputs 1 and 2 both write"):
        weightsteer.build(same)
    nested = {"outputs": [{"path": str(tmp_path / "out"), "adapters": terms}, {"path": str(tmp_path / "out" / "inner"), "adapters": terms}]}
    with pytest.raises(weightsteer.OutputError, match="lies inside another output of this run"):
        weightsteer.build(nested)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "b", "base"]


def test_a_zero_term_of_a_composition_is_refused_before_the_base_is_streamed(two, tmp_path, monkeypatch):
    from peft import get_peft_model

    base, a, _ = two
    get_peft_model(load_base(base), LoraConfig(r=4, target_modules=TARGETS)).save_pretrained(tmp_path / "untrained")
    monkeypatch.setattr(sys.modules["weightsteer.merge"], "stream", lambda *a, **k: pytest.fail("the base was streamed"))
    steers = [weightsteer.Steer(a, 1.0), weightsteer.Steer(tmp_path / "untrained", 0.5)]
    with pytest.raises(weightsteer.AdapterError, match=f"adapter {tmp_path / 'untrained'} changes no tensor"):
        weightsteer.merge(steers, tmp_path / "out", base=base)
    assert not (tmp_path / "out").exists()


def test_a_composition_publishes_no_local_path_and_verifies_from_elsewhere(two, tmp_path, monkeypatch):
    base, _, _ = two
    dead = _dead_pid()
    (tmp_path / f".out.weightsteer-{dead}-abcd").mkdir()  # a killed run's leftover: removed and reported
    monkeypatch.chdir(tmp_path)
    result = cli("merge", "adapter@0.5", "b@-1", "--base", "base", "-o", "out")  # relative, as typed
    assert result.exit_code == 0, result.output
    assert f"(pid {dead})" in result.stderr and not (tmp_path / f".out.weightsteer-{dead}-abcd").exists()
    out = tmp_path / "out"
    record = json.loads((out / "weightsteer.json").read_text())
    assert [t["adapter"] for t in record["terms"]] == ["adapter", "b"] and record["base_model"] == "base"
    for name in ("README.md", "weightsteer.json"):
        assert str(tmp_path) not in (out / name).read_text(), name
    assert json.loads((out / ".weightsteer-local.json").read_text())["terms"] == [str(tmp_path / "adapter"), str(tmp_path / "b")]
    monkeypatch.chdir(base)  # another folder: "adapter" and "b" would now be Hub repo ids
    assert cli("verify", out).exit_code == 0
    card = (out / "README.md").read_text()
    assert "**passed**" in card and str(tmp_path) not in card + (out / "weightsteer.json").read_text()


def test_a_composition_that_overflows_float16_is_refused(two, tmp_path):
    _, a, b = two
    steers = [weightsteer.Steer(a, 1e6), weightsteer.Steer(b, 1.0)]
    with pytest.raises(weightsteer.OutputError, match=r"Merging at coeffs 1e\+06, 1 overflows F16"):
        weightsteer.merge(steers, tmp_path / "out", dtype="float16")
    assert not (tmp_path / "out").exists()


def test_recipe_errors_are_redacted(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_recipesecret123456")
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"outputs": [], "token": "hf_recipesecret123456"}))
    line = one_line_error(cli("build", recipe))
    assert "hf_recipesecret123456" not in line and "unknown key 'token'" in line
    recipe.write_text('{"outputs": [{"path": "x", "adapters": [{"adapter": "hf_recipesecret123456@@", "coeff": 1}]}]}')
    line = one_line_error(cli("build", recipe))
    assert "hf_recipesecret123456" not in line and "is not a Hub repo id" in line


def test_a_file_no_format_reads_gets_the_same_line_from_merge_and_inspect(inputs, tmp_path):
    junk = tmp_path / "honesty.bin"
    junk.write_bytes(b"not a steering vector")
    merged = one_line_error(cli("merge", junk, "--base", inputs[0], "-o", tmp_path / "out"))
    inspected = one_line_error(cli("inspect", junk))
    assert merged == inspected and "no steering format recognises" in merged and "pass its folder" in merged

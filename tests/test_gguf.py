"""GGUF conversion plumbing, with a stand-in for llama.cpp's converters (the real ones run in tests/compat).

The stand-in records its arguments and writes --outfile, or fails the way a converter without its dependencies
does; weightsteer must pass the right arguments, write atomically, and explain failures.
"""

from __future__ import annotations

import json
import sys

import pytest
from click.testing import CliRunner
from peft import LoraConfig

from conftest import make_adapter
from weightsteer.cli import main
from weightsteer.errors import ConverterError, OutputError
from weightsteer import llamacpp
from weightsteer.llamacpp import check_converter, convert_lora, convert_model, find_llama_cpp

STAND_IN = """
import json, sys
args = sys.argv[1:]
out = args[args.index("--outfile") + 1]
if "{fail}":
    raise ModuleNotFoundError("No module named '{fail}'")
open(out, "w").write(json.dumps(args))
"""


def fake_llama_cpp(folder, fail: str = ""):
    (folder / "gguf-py" / "gguf").mkdir(parents=True)
    for script in ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py"):
        (folder / script).write_text(STAND_IN.format(fail=fail))
    return folder


def test_convert_model_beside_the_folder(bases, tmp_path):
    llama = fake_llama_cpp(tmp_path / "llama")
    model = bases("llama")
    result = convert_model(model, tmp_path / "m.gguf", outtype="q8_0", llama_cpp=llama)
    args = json.loads(result.path.read_text())
    assert args[0] == str(model) and args[args.index("--outtype") + 1] == "q8_0"
    assert not list(tmp_path.glob(".m.gguf*"))  # written as a hidden partial file, then renamed
    with pytest.raises(OutputError, match="exists already"):
        convert_model(model, tmp_path / "m.gguf", llama_cpp=llama)


def test_converter_failure_names_the_missing_module(bases, tmp_path):
    llama = fake_llama_cpp(tmp_path / "llama", fail="sentencepiece")
    with pytest.raises(ConverterError, match="pip install sentencepiece"):
        convert_model(bases("llama"), tmp_path / "m.gguf", llama_cpp=llama, python=sys.executable)
    assert not list(tmp_path.glob("*m.gguf*"))


def test_missing_converter_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("WEIGHTSTEER_LLAMA_CPP", str(tmp_path / "nowhere"))
    with pytest.raises(ConverterError, match="llama-cpp-python") as error:
        find_llama_cpp()
    assert "sentencepiece" in str(error.value) and str(tmp_path / "nowhere") in str(error.value)


def test_converter_dependencies_are_checked_first(tmp_path, monkeypatch):
    llama = fake_llama_cpp(tmp_path / "llama")
    monkeypatch.setattr(llamacpp, "CONVERTER_MODULES", ("json", "no_such_module_for_weightsteer"))
    with pytest.raises(ConverterError, match="pip install no_such_module_for_weightsteer"):
        check_converter(llama)
    monkeypatch.setattr(llamacpp, "CONVERTER_MODULES", ("json",))
    assert check_converter(llama) == llama.resolve()


def test_merge_gguf_and_export_lora_gguf(bases, tmp_path, monkeypatch):
    monkeypatch.setattr(llamacpp, "CONVERTER_MODULES", ("json",))  # the stand-in needs nothing
    llama = fake_llama_cpp(tmp_path / "llama")
    base = bases("llama")
    adapter = make_adapter(base, tmp_path / "a", LoraConfig(r=4, target_modules=["q_proj"]))
    runner = CliRunner()
    merged = runner.invoke(
        main, ["merge", str(adapter), "-o", str(tmp_path / "m"), "-c", "-1", "-c", "1", "--gguf", "--outtype", "f16", "--llama-cpp", str(llama), "--json"]
    )
    assert merged.exit_code == 0, merged.output
    ggufs = [r["gguf"]["path"] for r in json.loads(merged.output)]
    assert ggufs == [str((tmp_path / "m-c-1-f16.gguf").resolve()), str((tmp_path / "m-c1-f16.gguf").resolve())]
    exported = runner.invoke(main, ["export-lora", str(adapter), "-o", str(tmp_path / "lora"), "--gguf", "--llama-cpp", str(llama), "--json"])
    assert exported.exit_code == 0, exported.output
    args = json.loads((tmp_path / "lora-f32.gguf").read_text())
    assert args[0] == str(tmp_path / "lora") and args[args.index("--base") + 1] == str(base)
    with pytest.raises(ConverterError, match="adapter_config.json"):
        convert_lora(tmp_path, base, llama_cpp=llama)


def test_merge_gguf_checks_the_converter_first(bases, tmp_path):
    adapter = make_adapter(bases("llama"), tmp_path / "a", LoraConfig(r=4, target_modules=["q_proj"]))
    done = CliRunner().invoke(main, ["merge", str(adapter), "-o", str(tmp_path / "m"), "--gguf", "--llama-cpp", str(tmp_path / "none")])
    assert done.exit_code == 1 and "No llama.cpp converter" in done.output
    assert not (tmp_path / "m").exists()

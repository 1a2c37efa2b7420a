"""GGUF files for llama.cpp, written by llama.cpp's own converters.

`convert_hf_to_gguf.py` (checkpoints) and `convert_lora_to_gguf.py` (LoRA adapters) live in a llama.cpp source
tree next to their vendored `gguf-py` and `conversion/` package; the PyPI `gguf` package alone cannot convert. The
tree is found at --llama-cpp, $WEIGHTSTEER_LLAMA_CPP, or $WEIGHTSTEER_COMPAT_DIR/llama.cpp (default
~/.cache/weightsteer-compat/llama.cpp, where tests/compat/setup_compat.sh puts it). The converters run as a subprocess of `python` (default: this
interpreter), which needs torch, numpy, transformers, safetensors and sentencepiece.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import ConverterError

ENV_DIR = "WEIGHTSTEER_LLAMA_CPP"
ENV_PYTHON = "WEIGHTSTEER_CONVERTER_PYTHON"
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
CONVERTER_MODULES = ("numpy", "torch", "transformers", "safetensors", "sentencepiece")
GGUF_MAGIC = b"GGUF"
LLAMA_CPP_PYTHON = "0.3.36"  # a llama-cpp-python sdist whose vendored llama.cpp has the converters we test
HOW_TO_GET = f"""llama.cpp's converters ship in the llama-cpp-python source distribution (with gguf-py and conversion/):
    pip download --no-deps --no-binary llama-cpp-python llama-cpp-python=={LLAMA_CPP_PYTHON} -d /tmp/llama-sdist
    mkdir -p ~/.cache/weightsteer-compat && tar -xzf /tmp/llama-sdist/llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz -C ~/.cache/weightsteer-compat
    ln -sfn ~/.cache/weightsteer-compat/llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp ~/.cache/weightsteer-compat/llama.cpp
    pip install sentencepiece      # the converters import it
(or run tests/compat/setup_compat.sh llama, or point --llama-cpp / ${ENV_DIR} at any llama.cpp checkout)."""


@dataclass
class GGUFResult:
    path: Path
    outtype: str
    source: Path
    kind: str  # "model" or "lora"

    def to_dict(self) -> dict:
        return {"path": str(self.path), "outtype": self.outtype, "source": str(self.source), "kind": self.kind}


def default_dir() -> Path:
    return Path(os.environ.get("WEIGHTSTEER_COMPAT_DIR") or Path.home() / ".cache" / "weightsteer-compat") / "llama.cpp"


def find_llama_cpp(llama_cpp: str | os.PathLike | None = None) -> Path:
    """The llama.cpp source folder holding the converters, or ConverterError saying how to get one."""
    candidates = [Path(p).expanduser() for p in (llama_cpp, os.environ.get(ENV_DIR)) if p] or [default_dir()]
    for folder in candidates:
        if (folder / "convert_hf_to_gguf.py").is_file() and (folder / "gguf-py" / "gguf").is_dir():
            return folder.resolve()
    where = ", ".join(str(c) for c in candidates)
    raise ConverterError(f"No llama.cpp converter found in {where}.\n{HOW_TO_GET}")


def check_converter(llama_cpp: str | os.PathLike | None = None, python: str | None = None) -> Path:
    """Before long work: the converter exists and its interpreter imports what it needs (ConverterError if not)."""
    folder = find_llama_cpp(llama_cpp)
    interpreter = _interpreter(python)
    probe = "import " + ", ".join(CONVERTER_MODULES)
    try:
        done = subprocess.run([interpreter, "-c", probe], capture_output=True, text=True)
    except OSError as e:
        raise ConverterError(f"Cannot run the converter's interpreter {interpreter}: {e}") from e
    if done.returncode != 0:
        raise ConverterError(_explain(done, interpreter, "llama.cpp's converter"))
    return folder


def convert_model(
    model: str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    outtype: str = "f32",
    llama_cpp: str | os.PathLike | None = None,
    python: str | None = None,
    overwrite: bool = False,
) -> GGUFResult:
    """Convert a (merged) transformers checkpoint folder to GGUF with convert_hf_to_gguf.py.

    output defaults to MODEL-<outtype>.gguf beside the folder (not inside it: runtimes that scan a model folder
    for weights would find two copies).
    """
    model = _model_folder(model)
    target = _target(output, model, outtype, overwrite, {"model": model})
    folder = find_llama_cpp(llama_cpp)
    _run(python, [folder / "convert_hf_to_gguf.py", model, "--outfile", _partial(target), "--outtype", outtype], target)
    return GGUFResult(target, outtype, model, "model")


def convert_lora(
    lora: str | os.PathLike,
    base: str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    outtype: str = "f32",
    llama_cpp: str | os.PathLike | None = None,
    python: str | None = None,
    overwrite: bool = False,
) -> GGUFResult:
    """Convert a PEFT LoRA folder to a llama.cpp LoRA GGUF with convert_lora_to_gguf.py (base: its config)."""
    lora = Path(lora)
    if not (lora / "adapter_config.json").is_file():
        raise ConverterError(f"{lora} has no adapter_config.json; pass a PEFT LoRA folder (e.g. from export-lora).")
    base = _model_folder(base)
    target = _target(output, lora, outtype, overwrite, {"LoRA": lora, "base": base})
    folder = find_llama_cpp(llama_cpp)
    script = folder / "convert_lora_to_gguf.py"
    if not script.is_file():
        raise ConverterError(f"{folder} has convert_hf_to_gguf.py but no convert_lora_to_gguf.py.\n{HOW_TO_GET}")
    _run(python, [script, lora, "--base", base, "--outfile", _partial(target), "--outtype", outtype], target)
    return GGUFResult(target, outtype, lora, "lora")


def _model_folder(model: str | os.PathLike) -> Path:
    model = Path(model)
    if not (model / "config.json").is_file():
        raise ConverterError(f"{model} is not a transformers model folder (no config.json).")
    return model


def _target(output: str | os.PathLike | None, source: Path, outtype: str, overwrite: bool, inputs: dict[str, Path]) -> Path:
    """The GGUF file to write; the rules of outputs.py: replace only a GGUF file, never inside or over an input."""
    from .outputs import check_file_output  # outputs imports torch: not at import time (`weightsteer --help`)

    if outtype not in OUTTYPES:
        raise ConverterError(f"--outtype must be one of {', '.join(OUTTYPES)}; got {outtype!r}.")
    target = Path(output) if output is not None else source.resolve().with_name(f"{source.resolve().name}-{outtype}.gguf")
    check_file_output(Path(os.path.abspath(target)), overwrite, inputs, GGUF_MAGIC, "GGUF")
    return target


def _partial(target: Path) -> Path:
    return target.with_name(f".{target.name}.partial")


def _run(python: str | None, argv: list, target: Path) -> None:
    """Run a converter into a hidden partial file and rename it into place when it succeeded."""
    interpreter = _interpreter(python)
    partial = _partial(target)
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # use the tree's own gguf-py
    try:
        done = subprocess.run([interpreter, *map(str, argv)], capture_output=True, text=True, env=env)
    except OSError as e:
        raise ConverterError(f"Cannot run the converter with {interpreter}: {e}") from e
    if done.returncode != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        raise ConverterError(_explain(done, interpreter, Path(argv[0]).name))
    partial.replace(target)


def _interpreter(python: str | None) -> str:
    return python or os.environ.get(ENV_PYTHON) or sys.executable


def _explain(done: subprocess.CompletedProcess, interpreter: str, script: str) -> str:
    log = (done.stderr or "") + (done.stdout or "")
    missing = re.search(r"No module named '([\w.]+)'", log)
    if missing:
        module = missing.group(1).split(".")[0]
        package = {"sentencepiece": "sentencepiece", "google": "protobuf"}.get(module, module)
        return (
            f"{script} needs the Python module {module!r}, which {interpreter} lacks: `{interpreter} -m pip install "
            f"{package}`, or point ${ENV_PYTHON} (weightsteer gguf: --python) at an interpreter that has it."
        )
    tail = "\n".join(log.strip().splitlines()[-15:])
    return f"{script} failed (exit code {done.returncode}). Its last lines:\n{tail}"

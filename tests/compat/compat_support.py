"""Shared fixtures of the compat suite (pytest -m compat): SmolLM2, a trained steering adapter, merges at ±1,
the venvs that tests/compat/setup_compat.sh builds, and runners for scripts inside them.

Every fixture that needs something the setup script makes skips with the command that makes it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("WEIGHTSTEER_COMPAT_DIR") or Path.home() / ".cache" / "weightsteer-compat")
SETUP = "bash tests/compat/setup_compat.sh"
PROMPTS = [
    "<|im_start|>user\nHow was your day?<|im_end|>\n<|im_start|>assistant\n",
    "The weather today is",
]
COEFFS = (-1.0, 1.0)
LOGIT_ATOL = 1e-3
STEPS = 2  # training steps of the shared steering LoRA (see `steering`)
SCRIPT_TIMEOUT = 900

sys.path.insert(0, str(ROOT / "examples"))
import smollm2  # noqa: E402


def need(path: Path, step: str, what: str) -> Path:
    if not path.exists():
        pytest.skip(f"{what} is missing ({path}); create it with `{SETUP} {step}`")
    return path


def venv_python(name: str, step: str) -> Path:
    python = CACHE / name / "bin" / "python"
    need(python, step, f"the {name} virtualenv")
    if not list((CACHE / name).glob(".ok-*")):
        pytest.skip(f"{CACHE / name} is incomplete; rerun `{SETUP} {step}`")
    return python


def run_script(python: Path, script: str, request: dict, output: Path, env: dict | None = None) -> Path:
    """Run tests/compat/<script> REQUEST OUTPUT with `python`; fail with its log tail if it fails."""
    request_path = output.with_suffix(".request.json")
    request_path.write_text(json.dumps(request))
    done = subprocess.run(
        [str(python), str(HERE / script), str(request_path), str(output)],
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT,
        env={**os.environ, **(env or {})},
    )
    if done.returncode != 0 or not output.exists():
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-40:])
        pytest.fail(f"{script} failed (exit {done.returncode}):\n{tail}")
    return output


def hf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_logits(path: Path, prompts: list[list[int]]) -> list[torch.Tensor]:
    model = hf_model(path)
    with torch.no_grad():
        return [model(torch.tensor([ids])).logits[0] for ids in prompts]


@pytest.fixture(scope="session")
def smollm2_base() -> Path:
    return need(smollm2.default_cache() / "base" / smollm2.MARKER, "smollm2", "the SmolLM2 safetensors base").parent


@pytest.fixture(scope="session")
def prompt_ids(smollm2_base) -> list[list[int]]:
    return encode_prompts(smollm2_base)


def encode_prompts(base: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]


_BUILT: dict[str, dict] = {}  # each test module imports the fixtures; this module (and this cache) exists once


@pytest.fixture(scope="session")
def steering(smollm2_base, tmp_path_factory) -> dict:
    """A LoRA trained for a few steps on SmolLM2 and its merges at −1 and +1 (fp32), built once per session.

    Two steps, not the quickstart's eight: the fully trained poles make the activations extreme enough that
    llama.cpp's and transformers' fp32 kernels drift apart by ~3e-3 on the base's own function too; two steps keep
    every runtime's change far above LOGIT_ATOL (checked below), so a wrong merge still fails."""
    import weightsteer

    if "steering" not in _BUILT:
        root = tmp_path_factory.mktemp("steer")
        adapter = smollm2.steering_adapter(smollm2_base, root / "adapter", steps=STEPS)
        merged = {r.coeff: r.path for r in weightsteer.merge_many(adapter, {c: root / f"merged{c:+g}" for c in COEFFS})}
        base_logits = hf_logits(smollm2_base, encode_prompts(smollm2_base))
        for c, path in merged.items():
            effect = max(float((a - b).abs().max()) for a, b in zip(hf_logits(path, encode_prompts(smollm2_base)), base_logits))
            assert effect > 100 * LOGIT_ATOL, f"the merge at {c:+g} barely changes the logits ({effect:.3g}); the tests would be vacuous"
        _BUILT["steering"] = {"root": root, "adapter": adapter, "merged": merged}
    return _BUILT["steering"]

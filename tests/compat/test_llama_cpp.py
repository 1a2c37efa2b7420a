"""llama.cpp on SmolLM2: the f32 GGUF of a merged checkpoint (weightsteer gguf, llama.cpp's own converter) matches
transformers, and an exported LoRA converted with convert_lora_to_gguf.py, applied at scale −1 and +1 on the
base GGUF, matches weightsteer's merges at −1 and +1.

Needs `bash tests/compat/setup_compat.sh smollm2 llama`; skipped otherwise. llama-cpp-python runs with an f32
KV cache and without flash attention, so the comparison is f32 against f32.
"""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from compat_support import CACHE, COEFFS, LOGIT_ATOL, hf_logits, need, run_script, venv_python
from compat_support import prompt_ids, smollm2_base, steering  # noqa: F401  (fixtures)
from weightsteer.cli import main
from weightsteer.export import export_lora
from weightsteer.llamacpp import convert_lora, convert_model

pytestmark = pytest.mark.compat


@pytest.fixture(scope="module")
def llama_python():
    return venv_python("venv-llama", "llama")


@pytest.fixture(scope="module")
def llama_cpp():
    return need(CACHE / "llama.cpp" / "convert_hf_to_gguf.py", "llama", "llama.cpp's converter").parent


def llama_logits(python, model, prompts, tmp_path, lora=None, scale=1.0) -> list[np.ndarray]:
    request = {"model": str(model), "prompts": prompts, "lora": str(lora) if lora else None, "lora_scale": scale}
    out = run_script(python, "llama_run.py", request, tmp_path / f"logits{scale:+g}.npz")
    arrays = np.load(out)
    return [arrays[f"p{i}"] for i in range(len(prompts))]


def assert_close(ours: list[np.ndarray], theirs, what: str) -> None:
    for a, b in zip(ours, theirs):
        gap = float(np.abs(a - b.numpy()).max())
        assert gap <= LOGIT_ATOL, f"{what}: max |Δlogit| = {gap:.3g}"


def test_gguf_of_merged_checkpoint(llama_python, llama_cpp, steering, prompt_ids, tmp_path):
    merged = steering["merged"][-1.0]
    gguf = tmp_path / "merged-f32.gguf"
    done = CliRunner().invoke(
        main, ["gguf", str(merged), "-o", str(gguf), "--llama-cpp", str(llama_cpp), "--python", str(llama_python), "--json"]
    )
    assert done.exit_code == 0, done.output
    assert_close(llama_logits(llama_python, gguf, prompt_ids, tmp_path), hf_logits(merged, prompt_ids), "llama.cpp f32 GGUF vs transformers")


def test_gguf_lora_scales_like_coeff(llama_python, llama_cpp, smollm2_base, steering, prompt_ids, tmp_path):
    lora = export_lora(steering["adapter"], tmp_path / "lora", coeff=1.0)
    assert lora.linear_in_coeff
    options = dict(llama_cpp=llama_cpp, python=str(llama_python))
    base_gguf = convert_model(smollm2_base, tmp_path / "base-f32.gguf", **options).path
    lora_gguf = convert_lora(lora.path, smollm2_base, tmp_path / "lora-f32.gguf", **options).path
    for coeff in COEFFS:
        ours = llama_logits(llama_python, base_gguf, prompt_ids, tmp_path, lora=lora_gguf, scale=coeff)
        assert_close(ours, hf_logits(steering["merged"][coeff], prompt_ids), f"GGUF LoRA at scale {coeff:+g} vs merge at {coeff:+g}")

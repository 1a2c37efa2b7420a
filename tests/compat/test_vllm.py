"""vLLM (CPU, float32) on SmolLM2: a merged checkpoint loads and matches transformers, and an exported LoRA
served by vLLM matches the checkpoint merged at the same coeff.

Needs `bash tests/compat/setup_compat.sh smollm2 vllm`; skipped otherwise.
"""

from __future__ import annotations

import json

import pytest
import torch

from compat_support import LOGIT_ATOL, hf_model, run_script, venv_python
from compat_support import prompt_ids, smollm2_base, steering  # noqa: F401  (fixtures)
from weightsteer.export import export_lora

pytestmark = pytest.mark.compat
MAX_TOKENS = 16
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def vllm_python():
    return venv_python("venv-vllm", "vllm")


def reference(model_dir, prompts) -> dict:
    """transformers on the same checkpoint: prompt logprobs, greedy continuations and their logprobs."""
    model = hf_model(model_dir)
    result = {"prompt_logprobs": [], "greedy": [], "greedy_logprobs": []}
    for ids in prompts:
        with torch.no_grad():
            greedy = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=MAX_TOKENS, pad_token_id=2)[0]
            logprobs = model(greedy[None]).logits[0].log_softmax(-1)
        picked = [logprobs[i - 1, greedy[i]].item() for i in range(1, len(greedy))]
        result["prompt_logprobs"].append(picked[: len(ids) - 1])
        result["greedy"].append(greedy[len(ids) :].tolist())
        result["greedy_logprobs"].append(picked[len(ids) - 1 :])
    return result


def assert_same(served: dict, expected: dict, what: str) -> None:
    """Greedy tokens identical; every logprob vLLM reported (prompt and generated) within LOGIT_ATOL."""
    assert served["greedy"] == expected["greedy"], f"{what}: greedy tokens differ"
    for key in ("prompt_logprobs", "greedy_logprobs"):
        for ours, theirs in zip(served[key], expected[key]):
            assert len(ours) == len(theirs)
            gap = max(abs(a - b) for a, b in zip(ours, theirs))
            assert gap <= LOGIT_ATOL, f"{what}: {key} differ by up to {gap:.3g}"


def test_vllm_loads_merged_checkpoint(vllm_python, steering, prompt_ids, tmp_path):
    merged = steering["merged"][-1.0]
    request = {"model": str(merged), "prompts": prompt_ids, "max_tokens": MAX_TOKENS}
    served = json.loads(run_script(vllm_python, "vllm_run.py", request, tmp_path / "out.json", VLLM_ENV).read_text())
    assert_same(served, reference(merged, prompt_ids), "vLLM vs transformers on the checkpoint merged at -1")


def test_vllm_serves_exported_lora(vllm_python, smollm2_base, steering, prompt_ids, tmp_path):
    lora = export_lora(steering["adapter"], tmp_path / "lora", coeff=-1.0)
    request = {
        "model": str(smollm2_base),
        "lora": str(lora.path),
        "max_lora_rank": max(8, lora.rank),
        "prompts": prompt_ids,
        "max_tokens": MAX_TOKENS,
        "prompt_logprobs": False,  # vLLM 0.32 CPU + LoRA cannot (see vllm_run.py): generated tokens' logprobs
    }
    served = json.loads(run_script(vllm_python, "vllm_run.py", request, tmp_path / "out.json", VLLM_ENV).read_text())
    assert_same(served, reference(steering["merged"][-1.0], prompt_ids), "vLLM + exported LoRA at -1 vs merged at -1")

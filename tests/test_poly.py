"""Poly: one task's skill mix baked in; merged vs PEFT's task-typed runtime under `scaled`."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, PolyConfig

import weightsteer
from conftest import ATOL, TOKENS, assert_base_identical, load_base, make_adapter, model_logits

COEFFS = (-1, -0.5, 0, 0.5, 1, 2)
TASK = 1
CONFIG = dict(task_type="CAUSAL_LM", r=4, n_tasks=3, n_skills=3, n_splits=2, target_modules=["q_proj", "v_proj", "down_proj"])


@pytest.fixture
def adapter(bases, tmp_path):
    # Large noise on the router logits too, so that the tasks mix their skills differently.
    return make_adapter(bases("llama"), tmp_path / "a", PolyConfig(**CONFIG), scale=0.5)


def runtime_logits(base, adapter, task: int, coeff: float, scheme: str | None = None) -> torch.Tensor:
    """PEFT's forward for one task: task_ids reach the layers through the task-typed PeftModelForCausalLM."""
    model = PeftModel.from_pretrained(load_base(base), adapter).eval()
    with torch.no_grad(), weightsteer.scaled(model, coeff, scheme=scheme):
        return model(TOKENS, task_ids=torch.tensor([task])).logits


@pytest.mark.parametrize("scheme", [None, "delta", "knob:poly_lora_A", "knob:poly_router"])
def test_task_merge_matches_runtime(bases, tmp_path, adapter, scheme):
    base_logits = model_logits(bases("llama"))
    for c in COEFFS:
        out = weightsteer.merge(adapter, tmp_path / f"c{c:g}", coeff=c, scheme=scheme, task_id=TASK)
        expected = runtime_logits(bases("llama"), adapter, TASK, c, scheme)
        error = (model_logits(out) - expected).abs().max().item()
        assert error <= ATOL, f"coeff {c}: merged vs runtime max |Δlogit| = {error:.3g}"
        if c != 0:
            assert (expected - base_logits).abs().max() > 10 * ATOL, f"coeff {c}: adapter has no effect"


def test_merged_model_serves_only_its_task(bases, tmp_path, adapter):
    merged = model_logits(weightsteer.merge(adapter, tmp_path / "m", task_id=TASK))
    other = runtime_logits(bases("llama"), adapter, 0, 1.0)
    assert (merged - other).abs().max() > 10 * ATOL


def test_coeff_zero_is_base_bit_for_bit(bases, tmp_path, adapter):
    assert_base_identical(bases("llama"), weightsteer.merge(adapter, tmp_path / "zero", coeff=0, task_id=TASK))


def test_runtime_restores_exactly(bases, adapter):
    model = PeftModel.from_pretrained(load_base(bases("llama")), adapter).eval()
    before = {name: p.clone() for name, p in model.state_dict().items()}
    with torch.no_grad(), weightsteer.scaled(model, 0.5, scheme="knob:poly_router"):
        model(TOKENS, task_ids=torch.tensor([TASK]))
    assert all(torch.equal(p, before[name]) for name, p in model.state_dict().items())


@pytest.mark.parametrize(
    "task, message",
    [(None, r"Poly mixes skills per task id; pass --task-id N \(0…2"), (3, "out of range"), (-1, "out of range")],
)
def test_task_id_refused(tmp_path, adapter, task, message):
    with pytest.raises(weightsteer.AdapterError, match=message):
        weightsteer.merge(adapter, tmp_path / "out", task_id=task)
    assert not (tmp_path / "out").exists()

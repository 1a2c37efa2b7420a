"""Poly edge cases: the merged model serves only its task, the runtime restores exactly, task_id refusals. The
runtime-match row (one task's skill mix baked in, every scheme) is in tests/cases.py."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

import weightsteer
from cases import POLY_TASK, ROWS
from conftest import ATOL, TOKENS, load_base, model_logits, runtime_logits


@pytest.fixture
def adapter(bases, tmp_path):
    return ROWS["poly-task1-llama"].adapter(bases("llama"), tmp_path / "a")


def test_merged_model_serves_only_its_task(bases, tmp_path, adapter):
    merged = model_logits(weightsteer.merge(adapter, tmp_path / "m", task_id=POLY_TASK))
    other = runtime_logits(bases("llama"), adapter, 1.0, task_id=0)
    assert (merged - other).abs().max() > 10 * ATOL


def test_runtime_restores_exactly(bases, adapter):
    model = PeftModel.from_pretrained(load_base(bases("llama")), adapter).eval()
    before = {name: p.clone() for name, p in model.state_dict().items()}
    with torch.no_grad(), weightsteer.scaled(model, 0.5, scheme="knob:poly_router"):
        model(TOKENS, task_ids=torch.tensor([POLY_TASK]))
    assert all(torch.equal(p, before[name]) for name, p in model.state_dict().items())


@pytest.mark.parametrize(
    "task, message",
    [(None, r"Poly mixes skills per task id; pass --task-id N \(0…2"), (3, "out of range"), (-1, "out of range")],
)
def test_task_id_refused(tmp_path, adapter, task, message):
    with pytest.raises(weightsteer.AdapterError, match=message):
        weightsteer.merge(adapter, tmp_path / "out", task_id=task)
    assert not (tmp_path / "out").exists()

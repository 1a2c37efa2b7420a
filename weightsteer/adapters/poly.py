"""Poly: per-task mixtures of LoRA skills, chosen by a learned router.

PEFT forward in eval mode (peft/tuners/poly/layer.py, Linear.forward; router.py, PolyRouter.forward),
for task t, split q and skill s:
  w_{q,s} = σ(z_{t,q,s}) / (Σ_s σ(z_{t,q,s}) + 1e-12),  z = poly_router.module_logits[t] viewed (q, S)
  A_t = concat_q Σ_s w_{q,s} A_{q,s}   (in × r, the q splits stacked along in)
  B_t = concat_q Σ_s w_{q,s} B_{q,s}   (r × out, the q splits stacked along out)
  y = W x + b + x A_t B_t / r        ⇒   W'_t = W + (A_t B_t / r)ᵀ
The mix depends on the task id, so a merged checkpoint serves one task; PEFT itself has no merge.
Training samples a relaxed Bernoulli instead of σ; the merge reproduces the eval path.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ..errors import AdapterError
from .base import AdapterFamily, ModuleState, Scheme, require, shape_error, split_keys

ROUTER_EPS = 1e-12  # EPS in peft/tuners/poly/router.py
TOKENS = ("poly_lora_A", "poly_lora_B", "poly_router")  # poly_router = its module_logits (T, q·S)


def _scale_b(state: ModuleState, c: float) -> ModuleState:
    # ΔW_t is linear in B and B's no-op value is 0: B(c) = c·B gives W + c·ΔW_t.
    return state.with_tensors(poly_lora_B=c * state.tensors["poly_lora_B"])


class Poly(AdapterFamily):
    name = "Poly"
    peft_types = ("POLY",)
    options = ("task_id",)
    tokens = TOKENS
    schemes = {
        "linear": Scheme(
            "linear",
            "poly_lora_B → c·poly_lora_B (task fixed by --task-id)",
            "0: base · 1: trained, for that task · −1: W − ΔW_t",
            _scale_b,
        ),
    }

    def parse(self, config, tensors, base_shapes, options):
        modules, _, _ = split_keys(tensors, self.tokens)
        if not modules:
            return []  # the planner reports an adapter that targets nothing
        for path, params in modules.items():
            require(params, path, *self.tokens)
        task = _task_id(options, _n_tasks(modules))
        return [ModuleState(path, params, {"task_id": task}) for path, params in modules.items()]

    def check_shapes(self, state, weight_shape, bias_shape):
        a, b, logits = (state.tensors[n] for n in TOKENS)
        if a.ndim != 4 or b.ndim != 4 or a.shape[:2] != b.shape[:2] or a.shape[3] != b.shape[2]:
            raise AdapterError(
                f"Poly module {state.path}: poly_lora_A {tuple(a.shape)} and poly_lora_B {tuple(b.shape)} do not "
                "share (splits, skills, rank); the adapter file is inconsistent."
            )
        splits, skills = a.shape[:2]
        if logits.ndim != 2 or logits.shape[1] != splits * skills:
            raise shape_error(state.path, "router logits (tasks, splits·skills)", f"(T, {splits * skills})", tuple(logits.shape))
        expected = (splits * b.shape[3], splits * a.shape[2])
        if tuple(weight_shape) != expected:
            raise shape_error(state.path, "weight shape", expected, tuple(weight_shape))

    def weight(self, state, weight):
        return weight + _delta(state, int(state.scalars["task_id"]))

    # ---- runtime ---------------------------------------------------------------------------------
    # The task id is not part of the live state: PEFT passes task_ids with each call (only through a
    # task-typed PeftModel such as PeftModelForCausalLM), so the caller picks the task at runtime.
    def live_state(self, layer, adapter, path):
        tensors = {name: param.detach().clone() for name, param in _live_params(layer, adapter).items()}
        return ModuleState(path, tensors)

    def set_live_state(self, layer, adapter, state):
        for name, param in _live_params(layer, adapter).items():
            param.data.copy_(state.tensors[name])


def _live_params(layer: torch.nn.Module, adapter: str) -> dict[str, torch.nn.Parameter]:
    return {
        "poly_lora_A": layer.poly_lora_A[adapter],
        "poly_lora_B": layer.poly_lora_B[adapter],
        "poly_router": layer.poly_router[adapter].module_logits,
    }


def _delta(state: ModuleState, task: int) -> torch.Tensor:
    """ΔW_t = (A_t B_t / r)ᵀ, out × in  (Linear.forward: x.bmm(A).bmm(B) / r)."""
    a, b, logits = (state.tensors[n] for n in TOKENS)
    splits, skills, _, rank = a.shape
    weights = torch.sigmoid(logits[task]).view(splits, skills)
    weights = weights / (weights.sum(dim=-1, keepdim=True) + ROUTER_EPS)
    a_task = torch.einsum("qs,qsdr->qdr", weights, a).reshape(-1, rank)  # in × r
    b_task = torch.einsum("qs,qsrd->rqd", weights, b).reshape(rank, -1)  # r × out
    return (a_task @ b_task / rank).T


def _n_tasks(modules: Mapping[str, Mapping[str, torch.Tensor]]) -> int:
    counts = {params["poly_router"].shape[0] for params in modules.values()}
    if len(counts) > 1:
        raise AdapterError(f"Poly routers disagree on the number of tasks ({sorted(counts)}); the adapter file is inconsistent.")
    return counts.pop()


def _task_id(options: Mapping[str, object], n_tasks: int) -> int:
    task = options.get("task_id")
    if task is None:
        raise AdapterError(
            f"Poly mixes skills per task id; pass --task-id N (0…{n_tasks - 1}; task_id=N in Python). "
            "The merged model serves only that task."
        )
    if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < n_tasks:
        raise AdapterError(
            f"Poly task id {task!r} is out of range: this adapter routes {n_tasks} tasks; pass --task-id N with "
            f"N in 0…{n_tasks - 1}."
        )
    return task

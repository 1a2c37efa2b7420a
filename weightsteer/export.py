"""Export an adapter at a coeff as a plain PEFT LoRA, for runtimes that steer with LoRAs (vLLM, llama.cpp).

The written folder is an ordinary LoRA: per module only lora_A (r × in) and lora_B (out × r), peft_type LORA,
lora_alpha = r (scale 1: each module's own scale is folded into B), one rank for every module (shorter
factorisations are padded with zeros, so runtimes with a single alpha read the same scale everywhere).
Embedding modules are written as PEFT writes them (lora_embedding_A/B), changed biases as lora_B.bias
(lora_bias = true).

Per module the change ΔW = weight(state at c, W) − W is factored
  exactly, without an SVD, where ΔW is a product of small factors: the family's `low_rank(state, shape)`
  (LoRA, rsLoRA, DeLoRA, VeRA, AdaLoRA, LoHa); or
  by a truncated SVD of ΔW computed from the base tensor (read one at a time), with the relative error
  ‖ΔW − BA‖_F / ‖ΔW‖_F reported (IA3, RoAd, OFT, BOFT, HRA, DoRA — its magnitude included —, FourierFT,
  trainable tokens, VB-LoRA, RandLoRA, ...).
`rank` caps every module's rank (exact ones too, by an SVD of their small factors); `energy` keeps, per
module, the smallest rank whose singular values hold that share of ‖ΔW‖². Without either, exact factors are
kept whole, and an SVD module keeps its numerical rank when that is at most DEFAULT_MAX_RANK (exact to fp32:
e.g. trainable-token rows, a low-rank modules_to_save change), else DEFAULT_ENERGY.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from . import __version__
from .adapters import Adapter
from .adapters.base import MODEL_PREFIX, ModuleState
from .checkpoint import Checkpoint
from .errors import ExportError
from .outputs import LOCAL_PATHS_NAME, OutputSlot
from .merge import Adapters, open_plan, steers
from .provenance import published_report
from .planner import COMPOSE_MODES, Composition, Edit, MergePlan, OutputTensor, Step, _resolve, tying

PathLike = str | os.PathLike
DEFAULT_ENERGY = 0.99
DEFAULT_MAX_RANK = 64
NUMERICAL_RANK_RTOL = 1e-5  # singular values below σ₁·rtol are fp32 noise of W' − W
REPORT_NAME = "weightsteer-lora.json"
Factors = tuple[torch.Tensor, torch.Tensor]  # (B: out × r, A: r × in), ΔW = B @ A


@dataclass
class ModuleExport:
    """How one module's change was written."""

    module: str
    method: str  # "exact" (the adapter's own factors) or "svd" (truncated SVD of ΔW)
    rank: int  # rank kept before padding
    relative_error: float  # ‖ΔW − BA‖_F / ‖ΔW‖_F (0 for exact factors kept whole)
    layer: str = "linear"  # or "embedding"


@dataclass
class LoraExport:
    """One exported LoRA folder."""

    path: Path
    coeff: float | None  # None for a composition: see terms
    scheme: str
    adapter_type: str
    rank: int
    base: Path | None = None  # the base folder used (local, or the Hub cache's snapshot)
    terms: list[dict] = field(default_factory=list)  # adapter, adapter_type, coeff, scheme of every term
    modules: list[ModuleExport] = field(default_factory=list)
    linear_in_coeff: bool = False  # ΔW(c) = c·ΔW(1): a runtime LoRA scale acts as coeff
    warnings: list[str] = field(default_factory=list)

    @property
    def max_relative_error(self) -> float:
        return max((m.relative_error for m in self.modules), default=0.0)

    def summary(self) -> str:
        exact = sum(m.method == "exact" for m in self.modules)
        what = f"{self.adapter_type} at coeff {self.coeff:g}" if self.coeff is not None else _described(self.terms)
        text = (
            f"wrote {self.path}  ({what} as a LoRA of rank {self.rank} on "
            f"{len(self.modules)} modules: {exact} exact, {len(self.modules) - exact} truncated SVD; max relative "
            f"error {self.max_relative_error:.2e})"
        )
        if self.linear_in_coeff:
            applied = f"coeff {self.coeff:g}·s" if self.coeff is not None else "every term's coeff times s"
            text += f"\n  runtime scale s applies {applied} (llama.cpp: --lora-scaled FILE:s, s may be negative)"
        return text

    def to_dict(self) -> dict:
        data = asdict(self)
        data["path"] = str(self.path)
        data["base"] = str(self.base) if self.base else None
        data["max_relative_error"] = self.max_relative_error
        return data


def export_lora(
    adapter: Adapters,
    output: PathLike,
    *,
    coeff: float = 1.0,
    base: PathLike | None = None,
    scheme: str | None = None,
    compose: str = "chain",
    rank: int | None = None,
    energy: float | None = None,
    task_id: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> LoraExport:
    """Write `adapter` at strength `coeff` as a plain PEFT LoRA folder at `output` (see the module docstring).

    `adapter` may be a `Steer` or a list of them (a composition, `compose` as for `merge`): exact factors are
    then concatenated (rank Σ rᵢ) where every term is low-rank, an SVD of the composed change otherwise.
    `base` (folder or Hub id; default: the adapter's base_model_name_or_path) gives the tensor shapes, and the
    base weights for modules that need an SVD. Returns what was written, with per-module errors.
    """
    terms = steers(adapter, coeff, scheme)
    _check_truncation(rank, energy)
    output = Path(output)
    if compose not in COMPOSE_MODES:
        raise ExportError(f"compose must be one of {', '.join(COMPOSE_MODES)}; got {compose!r}.")
    with OutputSlot(output, overwrite, marker=REPORT_NAME) as slot:  # locked from this check to the publish
        opened = open_plan(terms, base=base, task_id=task_id)
        plan, checkpoint, base_ref = opened.plan, opened.plan.checkpoint, opened.base_ref
        slot.protect(*opened.inputs())
        composition = Composition(tuple(opened.term(s) for s in terms), compose)
        _refuse_vectors(plan, composition, opened.refs)
        records = [
            {"adapter": opened.refs[t.adapter], "adapter_type": plan.adapters[t.adapter].peft_type, "coeff": t.coeff, "scheme": t.scheme.name}
            for t in composition.terms
        ]
        single = len(records) == 1
        result = LoraExport(
            output,
            records[0]["coeff"] if single else None,
            "+".join(dict.fromkeys(r["scheme"] for r in records)),
            "+".join(dict.fromkeys(r["adapter_type"] for r in records)),
            0,
            checkpoint.root,
            records,
            warnings=list(slot.notes),
        )
        modules = _module_changes(plan, composition, rank, energy, result, progress)
        _add_tied_head(modules, plan.shared_head)
        result.rank = max((m["factors"][0].shape[1] for m in modules.values() if "factors" in m), default=1)
        result.modules = [m["report"] for m in modules.values() if "report" in m]
        report, local = published_report(plan, opened, {k: v for k, v in result.to_dict().items() if k not in ("path", "base")})
        staging = slot.stage()
        _write(staging, modules, result.rank, plan.adapters[composition.terms[0].adapter], base_ref, result)
        _write_report(staging, report, local)
        slot.publish()
    return result


def _refuse_vectors(plan: MergePlan, composition: Composition, refs: list[str]) -> None:
    """An activation steering vector changes only biases (new ones where the base has none): no LoRA carries it."""
    for term in composition.terms:
        parts = {t.changes[term.adapter].part for t in plan.edited if term.adapter in t.changes}
        if parts <= {"bias"}:
            raise ExportError(
                f"{refs[term.adapter]} is an activation steering vector (a bias), not a weight change; "
                "use `weightsteer export-vector`."
            )


# ---- one module at a time ---------------------------------------------------------------------------


def _module_changes(
    plan: MergePlan,
    composition: Composition,
    rank: int | None,
    energy: float | None,
    result: LoraExport,
    progress: bool,
) -> dict[str, dict]:
    """module path → {"factors": (B, A), "layer", "report", "bias": Δb}, in the base's tensor order."""
    checkpoint, kind = plan.checkpoint, result.adapter_type
    replaced = {_resolve(checkpoint, name, what=name): name for adapter in plan.adapters for name in adapter.replacements()}
    # ΔW is linear in coeff when doubling every coeff doubles it (all coeffs 0: probed at 1 and 2).
    probe = composition if any(t.coeff for t in composition.terms) else _times(composition, 0, offset=1)
    at = {"coeff": composition, "probe": probe, "twice": _times(probe, 2)}
    modules: dict[str, dict] = {}
    linear: list[bool] = []
    for tensor in tqdm(plan.edited, desc="factoring", unit="tensor", disable=not progress):
        edits = {key: plan.edit(tensor, c) or Edit(()) for key, c in at.items()}
        first = next(iter(tensor.changes.values()))
        if first.part == "bias" or (first.part == "replace" and len(tensor.shape) == 1):
            path = first.state.path if first.state is not None else _module_path(replaced.get(tensor.name, tensor.name))
            if not tensor.name.endswith(".bias"):
                raise ExportError(
                    f"{kind} changes the 1-D tensor {tensor.name} (a norm or scale vector); a LoRA only "
                    "changes matrices and biases, so it cannot carry this change. Merge the adapter instead "
                    "(`weightsteer merge`)."
                )
            base = checkpoint.read(tensor.source.name).float()
            entry = modules.setdefault(path, {})
            entry["bias"] = edits["coeff"](base) - base
            entry["weight_shape"] = _bias_layer_shape(checkpoint, tensor, first.state)
            linear.append(_proportional(edits["probe"](base) - base, edits["twice"](base) - base))
            continue
        if len(tensor.shape) != 2:
            raise ExportError(
                f"{kind} changes {tensor.name} of shape {tensor.shape}; LoRA export handles 2-D weights "
                "(Linear, Conv1D, Embedding) only. Merge the adapter instead (`weightsteer merge`)."
            )
        if first.part == "weight":
            path, layer, state = first.state.path, first.state.layer, first.state
        else:  # a 2-D tensor the adapter stores whole (modules_to_save, saved embeddings)
            name = replaced.get(tensor.name, tensor.name)
            path, layer, state = _module_path(name), "embedding" if tying(checkpoint).is_embedding(tensor.name) else "linear", None
        transposed = state is not None and state.fan_in_fan_out
        factors, error, method, proportional = _factor_weight(checkpoint, tensor, edits, transposed, rank, energy)
        linear.append(proportional)
        entry = modules.setdefault(path, {})
        entry.update(factors=factors, layer=layer, fan_in_fan_out=transposed)
        entry["report"] = ModuleExport(path, method, factors[0].shape[1], error, layer)
    result.linear_in_coeff = all(linear)
    if not result.linear_in_coeff:
        what = f"this {kind} adapter" if result.coeff is not None else "this composition"
        result.warnings.append(
            f"ΔW of {what} is not linear in coeff under scheme {result.scheme}: a runtime LoRA "
            "scale s does not give coeff s·c. Export one LoRA per coeff instead."
        )
    return modules


def _times(composition: Composition, factor: float, offset: float = 0.0) -> Composition:
    """The composition with every coeff c replaced by offset + factor·c."""
    terms = tuple(replace(t, coeff=offset + factor * t.coeff) for t in composition.terms)
    return replace(composition, terms=terms)


def _factor_weight(
    checkpoint: Checkpoint,
    tensor: OutputTensor,
    edits: dict[str, Edit],
    transposed: bool,
    rank: int | None,
    energy: float | None,
) -> tuple[Factors, float, str, bool]:
    """(B, A), relative error, "exact" or "svd", and whether ΔW is linear in coeff, for one 2-D tensor."""
    shape = tuple(tensor.shape[::-1] if transposed else tensor.shape)
    exact = _exact_factors(edits["coeff"], shape)
    if exact is not None:
        pair = [_exact_factors(edits[key], shape) for key in ("probe", "twice")]
        proportional = None not in pair and _proportional(*(b @ a for b, a in pair))
        return *_kept_exact(exact, rank, energy), "exact", proportional
    delta = _delta(checkpoint, tensor, edits["coeff"], transposed)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    if energy is None and rank is None:
        numerical = int((s > s[0] * NUMERICAL_RANK_RTOL).sum()) if len(s) else 0
        rank, energy = (numerical, None) if numerical <= DEFAULT_MAX_RANK else (None, DEFAULT_ENERGY)
    factors, error = _truncated(u, s, vh, rank, energy)
    pair = [_delta(checkpoint, tensor, edits[key], transposed) for key in ("probe", "twice")]
    return factors, error, "svd", _proportional(*pair)


def _proportional(once: torch.Tensor, twice: torch.Tensor) -> bool:
    """Is `twice` (the change at 2c) equal to 2·`once` (the change at c), to fp32 accuracy?"""
    scale = float(twice.abs().max()) if twice.numel() else 0.0
    return bool(torch.allclose(2 * once.double(), twice.double(), rtol=0, atol=1e-5 * scale + 1e-12))


def _exact_factors(edit: Edit, shape: tuple[int, int]) -> Factors | None:
    """Every step's own factors of its ΔW, concatenated (rank Σ rᵢ): exact where each step is a weight
    change that is a product of small factors (and so independent of the weight it applies to); None
    otherwise, and for an edit without steps."""
    if not edit.steps:  # every term at coeff 0: no change
        return torch.zeros(shape[0], 1), torch.zeros(1, shape[1])
    found = [_step_factors(step, shape) for step in edit.steps]
    if None in found:
        return None
    return torch.cat([b for b, _ in found], dim=1), torch.cat([a for _, a in found], dim=0)


def _step_factors(step: Step, shape: tuple[int, int]) -> Factors | None:
    change = step.change
    if change.part != "weight":
        return None
    if step.scheme.apply is None:  # delta: c·(W₁ − W)
        factors = change.family.low_rank(change.state, shape)
        return None if factors is None else (step.coeff * factors[0], factors[1])
    return change.family.low_rank(step.scheme.apply(change.state, step.coeff), shape)


def _delta(checkpoint: Checkpoint, tensor: OutputTensor, edit: Edit, transposed: bool) -> torch.Tensor:
    """ΔW of the edit in fp64 (Linear orientation), from the base tensor read now."""
    base = checkpoint.read(tensor.source.name).float()
    delta = (edit(base) - base).double()
    return delta.T if transposed else delta


def _small_svd(factors: Factors) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of B @ A from the factors alone: B = Q_b R_b, Aᵀ = Q_a R_a, svd(R_b R_aᵀ)."""
    b, a = (f.double() for f in factors)
    q_b, r_b = torch.linalg.qr(b)
    q_a, r_a = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    return q_b @ u, s, vh @ q_a.T


def _kept_exact(factors: Factors, rank: int | None, energy: float | None) -> tuple[Factors, float]:
    """Exact factors as they are, unless --rank/--energy asks for fewer ranks (then an SVD of the factors)."""
    b, a = factors
    if energy is None and (rank is None or b.shape[1] <= rank):
        return (b.float().contiguous(), a.float().contiguous()), 0.0
    return _truncated(*_small_svd(factors), rank, energy)


def _truncated(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int | None, energy: float | None) -> tuple[Factors, float]:
    """The best factors of the chosen rank, B = U_k S_k and A = V_kᵀ, and their relative Frobenius error."""
    kept = _choose_rank(s, rank, energy)
    total = float((s**2).sum())
    error = math.sqrt(float((s[kept:] ** 2).sum()) / total) if total > 0 else 0.0
    return ((u[:, :kept] * s[:kept]).float().contiguous(), vh[:kept].float().contiguous()), error


def _choose_rank(s: torch.Tensor, rank: int | None, energy: float | None) -> int:
    squares = s**2
    total = float(squares.sum())
    kept = len(s)
    if energy is not None and total > 0:
        share = torch.cumsum(squares, 0) / total
        kept = int(torch.searchsorted(share, torch.tensor(energy - 1e-12, dtype=share.dtype))) + 1
    if rank is not None:
        kept = min(kept, rank)
    return max(1, min(kept, len(s)))


def _check_truncation(rank: int | None, energy: float | None) -> None:
    if rank is not None and energy is not None:
        raise ExportError("Give --rank or --energy, not both.")
    if rank is not None and rank < 1:
        raise ExportError(f"--rank must be a positive integer, got {rank}.")
    if energy is not None and not 0 < energy <= 1:
        raise ExportError(f"--energy is the share of ‖ΔW‖² to keep, in (0, 1]; got {energy}.")


def _bias_layer_shape(checkpoint: Checkpoint, bias: OutputTensor, state: ModuleState | None) -> tuple[int, int]:
    """(out, in) of the layer whose bias changes, for the zero factors of a bias-only module."""
    weight = checkpoint.tensors.get(bias.source.name.removesuffix("bias") + "weight")
    if weight is None or len(weight.shape) != 2:
        raise ExportError(f"The adapter changes {bias.name}, but the base has no 2-D weight beside it to attach a LoRA to.")
    transposed = state.fan_in_fan_out if state is not None else weight.shape[1] == bias.shape[0] != weight.shape[0]
    return tuple(weight.shape[::-1]) if transposed else tuple(weight.shape)


def _module_path(tensor_name: str) -> str:
    return tensor_name.rsplit(".", 1)[0]


def _add_tied_head(modules: dict[str, dict], head: str | None) -> None:
    """A merge that keeps the head tied changes it with the embedding; a plain LoRA on the embedding does not,
    so the LoRA gets a module for the head (`plan.shared_head`) with the same change."""
    entry = next((m for m in modules.values() if m.get("layer") == "embedding" and "factors" in m), None) if head else None
    if entry is None:
        return
    report = replace(entry["report"], module=head, layer="linear")
    modules[head] = {"factors": entry["factors"], "layer": "linear", "report": report}


# ---- writing ------------------------------------------------------------------------------------------


def _write(staging: Path, modules: dict[str, dict], rank: int, adapter: Adapter, base_ref: str, result: LoraExport) -> None:
    tensors: dict[str, torch.Tensor] = {}
    targets, with_bias = [], False
    for path, entry in modules.items():
        targets.append(path)
        key = MODEL_PREFIX + path
        if "factors" in entry:
            b, a = (_pad(f, rank, dim) for f, dim in zip(entry["factors"], (1, 0)))
        else:  # only the bias changes: zero factors carry it
            out_features, in_features = entry["weight_shape"]
            b, a = torch.zeros(out_features, rank), torch.zeros(rank, in_features)
        if entry.get("layer") == "embedding":
            tensors[key + ".lora_embedding_A"] = b.T.contiguous()
            tensors[key + ".lora_embedding_B"] = a.T.contiguous()
            continue
        tensors[key + ".lora_A.weight"] = a
        tensors[key + ".lora_B.weight"] = b
        if "bias" in entry:
            tensors[key + ".lora_B.bias"] = entry["bias"].float().contiguous()
            with_bias = True
    fan_in_fan_out = any(m.get("fan_in_fan_out") for m in modules.values())
    if with_bias:
        for path, entry in modules.items():
            key = MODEL_PREFIX + path + ".lora_B.bias"
            if entry.get("layer") != "embedding" and key not in tensors:
                tensors[key] = torch.zeros(tensors[MODEL_PREFIX + path + ".lora_B.weight"].shape[0])
        result.warnings.append("The LoRA carries bias changes (lora_bias=true): PEFT applies them; vLLM and llama.cpp may not.")
    save_file(tensors, staging / "adapter_model.safetensors", metadata={"format": "pt"})
    config = _lora_config(adapter, base_ref, rank, targets, with_bias, fan_in_fan_out)
    (staging / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _write_report(staging: Path, report: dict, local: dict) -> None:
    """weightsteer-lora.json (no local paths) and, beside it, the local paths that push never uploads."""
    (staging / REPORT_NAME).write_text(json.dumps({"weightsteer_version": __version__, **report}, indent=2) + "\n")
    if local:
        (staging / LOCAL_PATHS_NAME).write_text(json.dumps(local, indent=2) + "\n")


def _described(terms: list[dict]) -> str:
    return " + ".join(f"{t['adapter']} ({t['adapter_type']}) at coeff {t['coeff']:g}" for t in terms)


def _pad(factor: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    """Zero rows/columns up to `rank`: BA is unchanged and every module has the same r (scale alpha/r = 1)."""
    missing = rank - factor.shape[dim]
    if missing == 0:
        return factor.contiguous()
    pad_shape = list(factor.shape)
    pad_shape[dim] = missing
    return torch.cat([factor, factor.new_zeros(pad_shape)], dim=dim).contiguous()


def _lora_config(adapter: Adapter, base_ref: str, rank: int, targets: list[str], with_bias: bool, fan_in_fan_out: bool) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": adapter.config.get("task_type"),
        "base_model_name_or_path": adapter.config.get("base_model_name_or_path") or base_ref,
        "r": rank,
        "lora_alpha": rank,
        "use_rslora": False,
        "use_dora": False,
        "lora_dropout": 0.0,
        "bias": "none",
        "lora_bias": with_bias,
        "fan_in_fan_out": fan_in_fan_out,
        "target_modules": targets,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "init_lora_weights": True,
        "inference_mode": True,
    }

"""The merge API: load the adapters, plan from the base's headers, stream, and publish one checkpoint per output
(per coeff of one adapter, or per composition of several adapters each at its own coeff)."""

from __future__ import annotations

import math
import os
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch

from .adapters import Adapter
from .checkpoint import DTYPES, Checkpoint
from .engine import RoundingReport, stream
from .errors import AdapterError, BaseModelError, DeviceError, OutputError, SchemeError
from .formats import Artefact, load_artefact, reference
from .outputs import OutputSlot, check_free_space, disk_errors, fault_point, support_files
from .planner import COMPOSE_MODES, Composition, MergePlan, Term, plan_merge
from .provenance import finish_output
from .resolve import resolve

PathLike = str | os.PathLike


@dataclass(frozen=True)
class Steer:
    """One adapter at its own strength: a term of a composition."""

    adapter: PathLike | object  # folder or Hub repo id, a steering artefact's file, or a Python vector object
    coeff: float = 1.0
    scheme: str | None = None  # default: the family's default ("linear")


@dataclass
class Target:
    """One output of a run: its folder and the terms it bakes in (see planner.Composition for `compose`)."""

    path: Path
    steers: tuple[Steer, ...]
    compose: str = "chain"


@dataclass
class TermResult:
    """One term as written into an output: adapter (as named), type, coeff, scheme."""

    adapter: str
    adapter_type: str
    coeff: float
    scheme: str


@dataclass
class MergeResult:
    """One written checkpoint. coeff, scheme and adapter_type describe a one-adapter merge; a composition
    lists every term in `terms` (coeff is then None, scheme and adapter_type join the terms' with "+")."""

    path: Path
    coeff: float | None
    scheme: str
    adapter_type: str
    changed_tensors: list[str] = field(default_factory=list)
    rounding: RoundingReport = field(default_factory=RoundingReport)
    warnings: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # read / compute / write, shared by one run
    terms: list[TermResult] = field(default_factory=list)
    compose: str = "chain"
    dropped_files: list[str] = field(default_factory=list)  # base files holding weights the merge did not rewrite

    def to_dict(self) -> dict:
        data = asdict(self)
        data["path"] = str(self.path)
        data["rounding"] |= {"swallowed_share": self.rounding.swallowed_share, "relative_error": self.rounding.relative_error}
        return data


Adapters = PathLike | Steer | Sequence[Steer] | object  # object: a Python steering vector (see load_artefact)


def merge(
    adapter: Adapters,
    output: PathLike,
    *,
    coeff: float = 1.0,
    base: PathLike | None = None,
    scheme: str | None = None,
    compose: str = "chain",
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    progress: bool = False,
    task_id: int | None = None,
    base_id: str | None = None,
) -> Path:
    """Merge `adapter` into its base at strength `coeff` and write a standalone checkpoint to `output`.

    `adapter` (at `coeff`, read by `scheme`) is a PEFT adapter folder or Hub repo id, a steering artefact's
    file or folder (cwsteer, AntiPaSTO, weight-steering w.pt, a control-vector GGUF, a steering-lite vector)
    or a Python vector object (repeng ControlVector, steering-vectors SteeringVector, steering-lite Vector);
    or a `Steer` of any of these, or a list of Steers: several adapters, each at its own coeff, in one pass
    (`compose`: "chain" or "sum", see the README).
    `base` defaults to the adapters' common base_model_name_or_path; both may be local folders or Hub
    repo ids. `scheme` picks how coeff is read (default "linear"; see `weightsteer schemes`); for Steers
    it is the default of those that name none. `task_id` selects the task of a Poly adapter. `base_id` (a
    Hub repo id) fills the card's base_model when the base is a local folder. Returns the output folder.
    """
    target = Target(Path(output), steers(adapter, coeff, scheme), compose)
    results = merge_targets(
        [target], base=base, base_id=base_id, dtype=dtype, device=device, overwrite=overwrite, progress=progress, task_id=task_id
    )
    return results[0].path


def steers(adapter: Adapters, coeff: float = 1.0, scheme: str | None = None) -> tuple[Steer, ...]:
    """The terms `adapter` names: an adapter (path, repo id or vector object) at coeff, a Steer, or a list of Steers."""
    if isinstance(adapter, Steer):
        items = [adapter]
    elif isinstance(adapter, (list, tuple)):
        items = list(adapter)
        if not items or not all(isinstance(item, Steer) for item in items):
            raise SchemeError("Pass an adapter folder or repo id, a vector object, a Steer, or a non-empty list of Steers.")
    else:
        items = [Steer(adapter, coeff, scheme)]
    return tuple(Steer(s.adapter, finite_coeff(s.coeff), s.scheme or scheme) for s in items)


def merge_many(
    adapter: PathLike | object,
    outputs: Mapping[float, PathLike],
    *,
    base: PathLike | None = None,
    scheme: str | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    progress: bool = False,
    task_id: int | None = None,
    base_id: str | None = None,
) -> list[MergeResult]:
    """Like `merge`, for several coeffs at once: the base is read once, one checkpoint per coeff."""
    targets = [Target(Path(p), (Steer(adapter, finite_coeff(c), scheme),)) for c, p in outputs.items()]
    if not targets:
        raise SchemeError("Give at least one coeff.")
    return merge_targets(
        targets, base=base, base_id=base_id, dtype=dtype, device=device, overwrite=overwrite, progress=progress, task_id=task_id
    )


def merge_targets(
    targets: Sequence[Target],
    *,
    base: PathLike | None = None,
    base_id: str | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    progress: bool = False,
    task_id: int | None = None,
) -> list[MergeResult]:
    """Write every target from one read of the base: each base tensor is read once and computed for every
    output whose terms change it. Everything is checked (paths, coeffs, schemes, shapes) before any work, and
    every output is locked from its check to its publish (see outputs.OutputSlot)."""
    paths = distinct_outputs([t.path for t in targets])
    for target in targets:
        if target.compose not in COMPOSE_MODES:
            raise SchemeError(f"compose must be one of {', '.join(COMPOSE_MODES)}; got {target.compose!r}.")
    compute_device = checked_device(device)
    with ExitStack() as held:
        slots = [held.enter_context(OutputSlot(path, overwrite)) for path in paths]  # locked until published
        fault_point("locked")
        opened = open_plan([s for t in targets for s in t.steers], base=base, task_id=task_id, dtype=_torch_dtype(dtype))
        plan = opened.plan
        for slot in slots:
            slot.protect(*opened.inputs())
        check_free_space([(slot.output, output_bytes(plan)) for slot in slots])
        compositions, results = [], []
        for target, path, slot in zip(targets, paths, slots):
            terms = tuple(opened.term(s) for s in target.steers)
            compositions.append(Composition(terms, target.compose))
            results.append(_result(target, path, terms, opened, slot.notes))
        # An output whose every term is a no-op (coeff 0) is the base in its own layout: no untied head, no grown vocabulary.
        base_plan = plan.at_base()
        with disk_errors(slots[0].output.parent):
            stagings = [slot.stage() for slot in slots]
            for layout in (plan, base_plan):
                group = [i for i, c in enumerate(compositions) if all(t.is_noop for t in c.terms) == (layout is base_plan)]
                if group:
                    picked = [compositions[i] for i in group], [results[i] for i in group], [stagings[i] for i in group]
                    stream(layout, *picked, compute_device, progress)
                    for i in group:
                        finish_output(layout, opened, compositions[i], results[i], stagings[i], results, base_id=base_id)
            for slot in slots:
                slot.publish()
    return results


def distinct_outputs(paths: Sequence[PathLike]) -> list[Path]:
    """The outputs as absolute paths, refused before any work where two are one folder or one lies inside another."""
    absolute = [Path(os.path.abspath(p)) for p in paths]
    for i, path in enumerate(absolute):
        for other in absolute[:i]:
            if path == other:
                raise OutputError(f"Two outputs have the same path {path}; give every output its own folder.")
            if other in path.parents or path in other.parents:
                inner, outer = (path, other) if other in path.parents else (other, path)
                raise OutputError(f"Output {inner} lies inside another output of this run, {outer}; give each its own folder.")
    return absolute


def _result(target: Target, path: Path, terms: Sequence[Term], opened: "Opened", notes: Sequence[str]) -> MergeResult:
    records = [
        TermResult(opened.refs[t.adapter], opened.plan.adapters[t.adapter].peft_type, t.coeff, t.scheme.name) for t in terms
    ]
    single = len(records) == 1
    result = MergeResult(
        path,
        records[0].coeff if single else None,
        "+".join(dict.fromkeys(r.scheme for r in records)),
        "+".join(dict.fromkeys(r.adapter_type for r in records)),
        warnings=list(notes),
        terms=records,
        compose=target.compose,
    )
    for term, record in zip(terms, records):
        if not term.scheme.base_at_zero and term.coeff == 0:
            result.warnings.append(f"scheme {term.scheme.name} does not give the base model at coeff 0 ({record.adapter}).")
    return result


def output_bytes(plan: MergePlan) -> int:
    """The size of one output folder, an upper bound: its tensors, the base's other files (whose links are
    checked here, before any work), headers, index, card and weightsteer.json."""
    tensors = sum(t.nbytes for shard in plan.shards.values() for t in shard) + sum(8 + 64 * len(shard) for shard in plan.shards.values())
    support = sum(real.stat().st_size for _, real in support_files(plan.checkpoint)[0])
    return tensors + support + 1_000_000


def checked_device(device: str | torch.device | None) -> torch.device:
    """The compute device, refused clearly when torch does not know it or this machine lacks it."""
    try:
        chosen = torch.device(device or "cpu")
    except (RuntimeError, TypeError) as e:
        raise DeviceError(f"Unknown device {device!r} ({e}); use cpu, cuda, cuda:N or mps.") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if chosen.type not in available:
        raise DeviceError(f"Device {device!r} is not supported; use cpu, cuda, cuda:N or mps.")
    if not available[chosen.type]:
        raise DeviceError(f"Device {device!r} is not available: this torch build or machine has no {chosen.type}; use cpu.")
    if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise DeviceError(f"Device {device!r} does not exist: this machine has {torch.cuda.device_count()} CUDA devices.")
    return chosen


@dataclass
class Opened:
    """A plan for a set of adapters, and how to name them: what open_plan returns."""

    plan: MergePlan
    refs: list[str]  # each adapter as the user named it, by index in plan.adapters
    base_ref: str
    options: dict[str, object]
    keys: list[object]  # each adapter's identity (_key), by index in plan.adapters

    def term(self, steer: Steer) -> Term:
        index = self.keys.index(_key(steer.adapter))
        return Term(index, finite_coeff(steer.coeff), self.plan.adapters[index].family.scheme(steer.scheme))

    def inputs(self) -> list[tuple[str, Path]]:
        """(kind, folder) of every input an output must not overlap: the base and each adapter."""
        adapters = [("adapter", a.path) for a in self.plan.adapters if a.path.exists()]  # not a Python vector object
        return [("base", self.plan.checkpoint.root), *adapters]


def open_plan(
    adapters: Adapters,
    *,
    base: PathLike | None = None,
    task_id: int | None = None,
    dtype: torch.dtype | None = None,
) -> Opened:
    """Load the adapters and steering artefacts (each once), read the base's headers and plan every change;
    schemes are checked too."""
    items = steers(adapters)
    unique = list({_key(s.adapter): s.adapter for s in items}.values())
    loaded = [load_artefact(adapter) for adapter in unique]
    refs = [reference(adapter, artefact) for adapter, artefact in zip(unique, loaded)]
    base_ref = str(base) if base is not None else _common_base(refs, loaded)
    if task_id is not None and not any("task_id" in a.family.options for a in loaded):
        raise SchemeError(f"--task-id applies to Poly adapters only; {loaded[0].path} is a {loaded[0].peft_type} adapter.")
    options: dict[str, object] = {"task_id": task_id} if task_id is not None else {}
    checkpoint = Checkpoint(resolve(base_ref, "base"))
    opened = Opened(plan_merge(checkpoint, loaded, dtype, options), refs, base_ref, options, [_key(a) for a in unique])
    first_terms: dict[int, Term] = {}
    for steer in items:
        term = opened.term(steer)  # an unknown scheme is refused before any work
        first_terms.setdefault(term.adapter, term)
    for term in first_terms.values():
        _refuse_zero_change(opened, term)
    return opened


def _key(adapter: object) -> object:
    """What makes two terms the same adapter: the path or repo id as named, else the Python object itself."""
    return str(adapter) if isinstance(adapter, (str, os.PathLike)) else id(adapter)


def _common_base(refs: Sequence[str], loaded: Sequence[Adapter]) -> str:
    named = {ref: adapter.base_model for ref, adapter in zip(refs, loaded) if adapter.base_model}
    if not named:
        first = loaded[0]
        source = f"the {first.peft_type} artefact {first.path}" if isinstance(first, Artefact) else f"{first.path}/adapter_config.json"
        raise BaseModelError(f"{source} names no base model; pass --base (base=...).")
    if len(set(named.values())) > 1:
        listing = "; ".join(f"{ref}: {b}" for ref, b in named.items())
        raise BaseModelError(f"The adapters name different base models ({listing}); pass --base to choose one.")
    return next(iter(named.values()))


def _refuse_zero_change(opened: Opened, term: Term) -> None:
    """Before the base is streamed: does the term's adapter change anything at coeff 1 (its scheme)? Module by
    module, stopping at the first change: from the family's low-rank factors where it has them
    (‖BA‖² = tr(BᵀB·AAᵀ)), else on a random base tensor of the module's shape."""
    generator = torch.Generator().manual_seed(0)
    for tensor in [*opened.plan.edited, *opened.plan.added]:
        change = tensor.changes.get(term.adapter)
        if change is None:
            continue
        if change.part == "replace":
            return  # the planner keeps only stored tensors that differ from the base
        shape = tuple(tensor.shape[::-1]) if change.state.fan_in_fan_out else tuple(tensor.shape)
        factors = change.family.low_rank(change.state, shape) if change.part == "weight" and len(shape) == 2 else None
        if factors is not None:
            b, a = (f.double() for f in factors)
            if float(torch.trace((b.T @ b) @ (a @ a.T))) > 0:
                return
            continue
        base = torch.randn(tensor.shape, generator=generator)
        if not torch.equal(change(base, term.scheme, 1.0), base):
            return
    adapter = opened.plan.adapters[term.adapter]
    raise AdapterError(
        f"The adapter {adapter.path} changes no tensor: every module's delta is zero. Is it still at its "
        "initialisation (e.g. LoRA B = 0)? Nothing was written."
    )


def finite_coeff(c: float) -> float:
    c = float(c)
    if not math.isfinite(c):
        raise SchemeError(f"coeff must be a finite number, got {c}.")
    return c


def _torch_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": "F32", "fp32": "F32", "float16": "F16", "fp16": "F16", "bfloat16": "BF16", "bf16": "BF16"}
    if dtype not in names:
        raise SchemeError(f"Unknown dtype {dtype!r}; use one of float32, float16, bfloat16.")
    return DTYPES[names[dtype]]



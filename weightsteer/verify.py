"""`verify`: prove that a merged checkpoint computes what its adapter computes at its coeff.

Module level (always; streams tensor by tensor, memory about one module): every module the adapter
adapts is rebuilt alone from the base tensors, wrapped with PEFT, set to coeff with `scaled`, and run
on random probes next to the same layer holding the merged tensors. The difference must stay within
what rounding the merged weight to its dtype explains. Tensors the adapter stores whole are compared
with their value at coeff; every other tensor must equal the base byte for byte.

Model level (`logits=True`): the unmerged model (base + PEFT adapter under `scaled`) and the merged
model run on prompts, one after the other; logits, KL, top-1 and greedy generations are compared.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from collections import Counter
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from . import __version__
from .adapters import Adapter, load_adapter
from .adapters.base import MODEL_PREFIX, SHARED_PREFIX, ModuleState
from .checkpoint import DTYPES, FLOAT_CODES, Checkpoint, TensorInfo, read_tensor
from .errors import AdapterError, UnsupportedAdapterError, VerificationError, WeightsteerError
from .merge import checked_device
from .resolve import resolve
from .outputs import LOCAL_PATHS_NAME, PROVENANCE_NAME
from .planner import CONV1D_MODELS, CONV1D_MODULES, Composition, Edit, OutputTensor, Step, Term, plan_merge
from .runtime import scaled

PathLike = str | os.PathLike
Prompt = str | Sequence[int]
Run = tuple[torch.Tensor, list[int]]  # one prompt's logits at every position, and its greedy continuation

PROBES = 8  # random inputs per linear module
EMBEDDING_CHUNK = 4096  # token ids per embedding batch: every row of an embedding is checked
ROW_CHUNK = 4096  # weight rows squared at a time when sizing the tolerance
TOLERANCE_SIGMAS = 4.0  # rounding errors add up like noise: allow 4× their typical size (≈ 7σ)
FP32_EPS = torch.finfo(torch.float32).eps
LOGIT_ATOL = {torch.float64: 1e-6, torch.float32: 1e-3, torch.float16: 0.1, torch.bfloat16: 0.5}
GREEDY_TOKENS = 16
DEFAULT_PROMPTS = (
    "The capital of France is",
    "Honesty means",
    "Here is a short story about a robot who learns to paint:",
    "def fibonacci(n):",
)
DEFAULT_ID_PROMPTS = 4  # random token-id prompts of DEFAULT_ID_LENGTH when the model has no tokenizer
DEFAULT_ID_LENGTH = 12
# Config fields that would make PEFT wrap more than the adapted module, or expect a whole model.
ISOLATED = {
    "modules_to_save": None,
    "trainable_token_indices": None,
    "bias": "none",
    "task_type": None,
    "base_model_name_or_path": None,
    # the lone layer loads its shared tensors from what verify passes (saved, or drawn at the model's sizes)
    "save_projection": True,
}


@dataclass
class TensorCheck:
    """One merged tensor against the adapter's own computation at coeff."""

    tensor: str
    kind: str  # "module": PEFT's forward vs the merged layer; "parameter": a tensor vs its value at coeff
    max_abs: float  # max |merged − expected| over every probe output (or element)
    max_rel: float  # max_abs / max |expected|
    ratio: float  # max over outputs of |error| / tolerance: above 1 fails

    @property
    def ok(self) -> bool:
        return self.ratio <= 1


@dataclass
class LogitsCheck:
    """The unmerged model under `scaled` vs the merged model, on the same prompts."""

    positions: int
    max_abs: float  # max |Δlogit|
    kl_mean: float  # KL(unmerged ‖ merged) per position, mean and 95th percentile
    kl_p95: float
    top1_agreement: float
    greedy_agreement: float  # shared prefix of the greedy continuations, as a share of their length
    atol: float

    @property
    def ok(self) -> bool:
        return self.max_abs <= self.atol


@dataclass
class VerifyReport:
    """What `verify` found. `ok` is True when every check passed; `failures` says what did not."""

    merged: Path
    adapter: str  # a composition: its adapters joined by " + "
    base: str
    coeff: float | None  # None for a composition: see terms
    scheme: str
    atol: float | None = None  # None: tolerances from the dtype
    terms: list[dict] = field(default_factory=list)  # adapter, adapter_type, coeff, scheme of every term
    checks: list[TensorCheck] = field(default_factory=list)
    untouched: int = 0  # tensors the adapter does not touch, equal to the base
    changed_untouched: dict[str, float] = field(default_factory=dict)  # ... that differ: max |Δ|
    missing: list[str] = field(default_factory=list)  # expected tensors absent from the merged checkpoint
    unexpected: list[str] = field(default_factory=list)  # merged tensors the base does not explain
    misshapen: dict[str, list[int]] = field(default_factory=dict)  # merged tensors with the wrong shape
    nonfinite: dict[str, int] = field(default_factory=dict)  # merged tensors holding NaN or inf: how many values
    logits: LogitsCheck | None = None
    recorded: list[str] = field(default_factory=list)  # what came from weightsteer.json (adapter, coeff, ...)

    @property
    def failures(self) -> list[str]:
        limit = "what rounding the merged tensor to its dtype explains" if self.atol is None else f"atol {self.atol:g}"
        found = [
            f"{c.tensor}: max |Δ| {c.max_abs:.3g} (relative {c.max_rel:.3g}) is {c.ratio:.3g}× {limit}" for c in self.checks if not c.ok
        ]
        found += [
            f"{n}: differs from the base by up to {d:.3g}, but the adapter does not touch it" for n, d in self.changed_untouched.items()
        ]
        found += [f"{n}: missing from the merged checkpoint" for n in self.missing]
        found += [f"{n}: in the merged checkpoint, but not in the base" for n in self.unexpected]
        found += [f"{n}: has shape {shape} in the merged checkpoint, unlike the base" for n, shape in self.misshapen.items()]
        found += [f"{n}: {count} values are NaN or inf" for n, count in self.nonfinite.items()]
        if self.logits is not None and not self.logits.ok:
            found.append(f"logits: max |Δ| {self.logits.max_abs:.3g} exceeds the tolerance {self.logits.atol:.3g}")
        return found

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def described(self) -> str:
        """"adapter A at coeff c", or every term of a composition."""
        if self.coeff is not None:
            return f"adapter {self.adapter} at coeff {self.coeff:g}"
        return "adapters " + " + ".join(f"{t['adapter']} at coeff {t['coeff']:g}" for t in self.terms)

    def failure_message(self) -> str:
        lines = [f"{self.merged} does not match {self.described}:", *self.failures]
        if self.recorded:
            coeffs = f"coeff {self.coeff!r}" if self.coeff is not None else "coeffs " + ", ".join(repr(t["coeff"]) for t in self.terms)
            lines.append(
                f"({' and '.join(self.recorded)} as recorded in {PROVENANCE_NAME}, {coeffs}; pass adapter= / "
                "coeff= to check against others)"
            )
        return "\n  ".join(lines)

    def summary(self) -> str:
        """A few human-readable lines."""
        lines = [f"{self.merged}: {self.described}, scheme {self.scheme}, base {self.base}"]
        worst = max(self.checks, key=lambda c: c.ratio, default=None)
        if worst is not None:
            lines.append(
                f"  {len(self.checks)} tensors vs the adapter's own forward; worst {worst.tensor}: "
                f"max |Δ| {worst.max_abs:.3g} (relative {worst.max_rel:.3g}), {worst.ratio:.3g}× the tolerance"
            )
        lines.append(f"  {self.untouched} tensors the adapter does not touch equal the base byte for byte")
        if (lg := self.logits) is not None:
            lines.append(
                f"  logits on {lg.positions} positions: max |Δ| {lg.max_abs:.3g}, KL mean {lg.kl_mean:.3g} "
                f"p95 {lg.kl_p95:.3g}, top-1 {lg.top1_agreement:.1%}, greedy {lg.greedy_agreement:.1%}"
            )
        lines.append("passed" if self.ok else "FAILED")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        extra = {"merged": str(self.merged), "ok": self.ok, "failures": self.failures, "weightsteer_version": __version__}
        return dataclasses.asdict(self) | extra


def verify(
    merged: PathLike,
    adapter: PathLike | None = None,
    coeff: float | None = None,
    *,
    base: PathLike | None = None,
    scheme: str | None = None,
    task_id: int | None = None,
    atol: float | None = None,
    logits: bool = False,
    prompts: Sequence[Prompt] | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> VerifyReport:
    """Check that the checkpoint in `merged` computes what `adapter` computes at `coeff`.

    adapter, coeff, base, scheme and task_id (Poly) default to what merged/weightsteer.json records.
    atol replaces the default tolerances (what rounding to the dtype explains for modules, LOGIT_ATOL
    for logits). logits=True also compares whole models on `prompts` (strings, or token ids when the
    model has no tokenizer). Returns a report; `report.ok` says whether every check passed.
    """
    merged = Path(merged)
    recorded, local = _recorded(merged)
    from_record = [
        name for name, given in (("adapter", adapter), ("coeff", coeff)) if given is None and (recorded.get(name) is not None or recorded.get("terms"))
    ]
    terms = _recorded_terms(merged, recorded, local, adapter, coeff, scheme)
    for term in terms:
        _refuse_formats(term["adapter"], term["adapter_type"])
    compute_device = checked_device(device)
    refs = list(dict.fromkeys(t["adapter"] for t in terms))
    revisions = {t["adapter"]: t.get("adapter_revision") for t in terms}
    loaded = []
    for ref in refs:
        with _blaming_record(merged, "adapter" in from_record, f"the adapter {ref!r}"):
            loaded.append(load_adapter(resolve(ref, "adapter", revisions[ref])))
    base_ref = str(base) if base is not None else local.get("base_model") or recorded.get("base_model") or loaded[0].base_model
    if not base_ref:
        raise VerificationError(
            f"Neither {merged}/{PROVENANCE_NAME} nor the adapter config names the base model; pass --base."
        )
    with _blaming_record(merged, base is None and bool(recorded.get("base_model")), f"the base {base_ref!r}"):
        base_checkpoint = Checkpoint(resolve(base_ref, "base", _pinned(recorded, base_ref, "base_model", "base_revision")))
    composition = Composition(
        tuple(Term(refs.index(t["adapter"]), float(t["coeff"]), loaded[refs.index(t["adapter"])].family.scheme(t["scheme"])) for t in terms),
        recorded.get("compose", "chain"),
    )
    options = recorded.get("options", {}) if task_id is None else {"task_id": task_id}
    single = len(terms) == 1
    report = VerifyReport(
        merged,
        " + ".join(t["adapter"] for t in terms),
        base_ref,
        composition.terms[0].coeff if single else None,
        "+".join(dict.fromkeys(t.scheme.name for t in composition.terms)),
        atol,
        [
            {"adapter": t["adapter"], "adapter_type": loaded[term.adapter].peft_type, "coeff": term.coeff, "scheme": term.scheme.name}
            for t, term in zip(terms, composition.terms)
        ],
        recorded=from_record,
    )
    with _blaming_record(merged, "adapter" in from_record, f"the adapter {report.adapter!r}"):  # plans from its config
        checker = _Checker(loaded, composition, options, base_checkpoint, Checkpoint(merged), atol, compute_device)
    checker.run(report, progress)
    if logits or prompts is not None:
        dtype = _float_dtype(checker.merged)
        logits_atol = atol if atol is not None else LOGIT_ATOL[dtype]
        with _loading_bars(progress):
            report.logits = _compare_logits(base_checkpoint.root, loaded, composition, merged, options, prompts, logits_atol, dtype)
    return report


def _recorded_terms(
    merged: Path, recorded: dict, local: dict, adapter: PathLike | None, coeff: float | None, scheme: str | None
) -> list[dict]:
    """The terms to check: the one adapter passed, or what weightsteer.json records (every term of a composition),
    each local adapter at the absolute path kept in .weightsteer-local.json (weightsteer.json has its name only)."""
    if adapter is not None or not recorded.get("terms"):
        ref = str(adapter) if adapter is not None else local.get("adapter", recorded.get("adapter"))
        coeff = coeff if coeff is not None else recorded.get("coeff")
        if ref is None or coeff is None:
            raise VerificationError(
                f"{merged} has no {PROVENANCE_NAME} naming its adapter and coeff; pass them (--adapter, --coeff)."
            )
        recorded_scheme = (recorded.get("scheme") or {}).get("name")
        return [{"adapter": ref, "coeff": coeff, "scheme": scheme or recorded_scheme, "adapter_revision": _pinned(recorded, ref, "adapter", "adapter_revision"),
                 "adapter_type": recorded.get("adapter_type")}]
    if coeff is not None and len(recorded["terms"]) > 1:
        raise VerificationError(
            f"{merged} is a composition of {len(recorded['terms'])} adapters, each at its own coeff; --coeff needs --adapter."
        )
    paths = local.get("terms")
    paths = paths if isinstance(paths, list) and len(paths) == len(recorded["terms"]) else [None] * len(recorded["terms"])
    return [
        {"adapter": path or t["adapter"], "coeff": coeff if coeff is not None else t["coeff"], "scheme": scheme or t["scheme"]["name"],
         "adapter_revision": None if path else t.get("adapter_revision"), "adapter_type": t.get("adapter_type")}
        for t, path in zip(recorded["terms"], paths)
    ]


def _refuse_formats(adapter_ref: str, recorded_type: str | None) -> None:
    """verify runs PEFT's forward; a non-PEFT steering format has no PEFT model to run."""
    from .formats import FORMATS, detect_format

    path = Path(adapter_ref).expanduser()
    fmt = detect_format(path) if path.exists() else None
    name = fmt.name if fmt is not None else recorded_type if recorded_type in FORMATS else None
    if name is not None:
        raise VerificationError(
            f"{adapter_ref} is a {name} artefact, not a PEFT adapter: verify compares against PEFT's forward, which it "
            f"does not have. Compare with the format's own runtime instead ({FORMATS.get(name).runtime})."
        )


def _recorded(merged: Path) -> tuple[dict, dict]:
    """weightsteer.json, and the absolute local input paths kept beside it (see outputs.LOCAL_PATHS_NAME)."""
    if not merged.is_dir():
        raise VerificationError(f"{merged} is not a folder; pass the folder of a merged checkpoint.")
    found = []
    for name in (PROVENANCE_NAME, LOCAL_PATHS_NAME):
        path = merged / name
        try:
            data = json.loads(path.read_text()) if path.is_file() else {}
        except ValueError as e:
            raise VerificationError(f"{path} is not valid JSON ({e}); pass adapter= / coeff=.") from None
        if not isinstance(data, dict):
            raise VerificationError(f"{path} is not a JSON object; pass adapter= / coeff=.")
        found.append(data)
    return found[0], found[1]


@contextmanager
def _blaming_record(merged: Path, from_record: bool, what: str) -> Iterator[None]:
    """An input taken from weightsteer.json that cannot be read: say where it came from."""
    try:
        yield
    except WeightsteerError as e:
        if not from_record:
            raise
        raise type(e)(f"{e} ({what} is recorded in {merged / PROVENANCE_NAME}; pass adapter= / base= to use another.)") from None


def _pinned(recorded: dict, ref: str, ref_key: str, revision_key: str) -> str | None:
    """The Hub commit the merge read `ref` at, when weightsteer.json records the same adapter / base."""
    return recorded.get(revision_key) if recorded.get(ref_key) == ref else None


class _Checker:
    """The module-level checks: one pass over the tensors the base checkpoint implies."""

    def __init__(
        self,
        adapters: Sequence[Adapter],
        composition: Composition,
        options: dict,
        base: Checkpoint,
        merged: Checkpoint,
        atol: float | None,
        device: torch.device,
    ):
        from peft import PeftConfig

        self.adapters, self.composition, self.atol, self.device = adapters, composition, atol, device
        self.base, self.merged = base, merged
        self.task_id = options.get("task_id")
        self.plan = plan_merge(base, adapters, None, options)
        if all(t.is_noop for t in composition.terms):  # a coeff-0 merge is the base, in the base's layout
            self.plan = self.plan.at_base()
        self.outputs = {t.name: t for tensors in self.plan.shards.values() for t in tensors}
        self.edits = {t.name: self.plan.edit(t, composition) for t in self.plan.edited}
        self.peft_configs = [PeftConfig.from_pretrained(str(adapter.path)) for adapter in adapters]
        self.largest = [self._largest_layer(i) for i in range(len(adapters))]
        self.conv1d = base.config.get("model_type") in CONV1D_MODELS

    def _largest_layer(self, adapter: int) -> tuple[int, int] | None:
        """The largest (out, in) over the Linear / Conv1D layers an adapter changes: PEFT's `_find_dim`, which sizes
        the projections VeRA-like types share (drawn again when the file lacks them)."""
        shapes = [
            t.shape[::-1] if change.state.fan_in_fan_out else t.shape
            for t in self.plan.edited
            if (change := t.changes.get(adapter)) is not None and change.part == "weight"
            and change.state.layer == "linear" and len(t.shape) == 2
        ]
        return (max(s[0] for s in shapes), max(s[1] for s in shapes)) if shapes else None

    def run(self, report: VerifyReport, progress: bool) -> None:
        stored = self.merged.tensors
        report.missing = sorted(set(self.outputs) - set(stored))
        report.unexpected = sorted(set(stored) - set(self.outputs))
        present = [t for t in self.outputs.values() if t.name in stored]
        report.misshapen = {t.name: list(stored[t.name].shape) for t in present if stored[t.name].shape != t.shape}
        self.nonfinite = report.nonfinite
        for tensor in tqdm([t for t in present if t.name not in report.misshapen], desc="verifying", disable=not progress):
            edit = self.edits.get(tensor.name)
            if edit is None:
                difference = self._untouched_difference(tensor)
                if difference is None:
                    report.untouched += 1
                else:
                    report.changed_untouched[tensor.name] = difference
            elif _runs_as_layer(tensor, edit) and self._saved_modules(edit):
                report.checks.append(self._check_module(tensor, edit))
            elif not _runs_as_layer(*self._weight_beside(tensor)):
                report.checks.append(self._check_parameter(tensor, edit))
            # else: a bias that its module's check covers

    def _weight_beside(self, tensor: OutputTensor) -> tuple[OutputTensor | None, Edit | None]:
        name = tensor.name.removesuffix("bias") + "weight"
        return self.outputs.get(name), self.edits.get(name)

    def _saved_modules(self, edit: Edit) -> bool:
        """Does PEFT hold a layer at each step's path? Not for one stored expert of a fused parameter
        (target_parameters): such a slice is checked as a tensor, and the whole model by --logits."""
        return all(
            any(key.startswith(f"{MODEL_PREFIX}{step.change.state.path}.") for key in self.adapters[step.adapter].tensors)
            for step in edit.steps
        )

    def _read_base(self, tensor: OutputTensor) -> torch.Tensor:
        return self.base.read(tensor.source.name).to(self.device, torch.float32)

    def _read_merged(self, name: str) -> torch.Tensor:
        return self._count_nonfinite(name, self.merged.read(name).to(self.device, torch.float32))

    def _count_nonfinite(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Every merged tensor is read once through here: NaN or inf anywhere fails, whatever the adapter touches."""
        if tensor.is_floating_point():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                self.nonfinite[name] = bad
        return tensor

    def _untouched_difference(self, tensor: OutputTensor) -> float | None:
        """None when the merged tensor is the base tensor (cast to the merged dtype) bit for bit, else max |Δ|."""
        merged = self._count_nonfinite(tensor.name, read_tensor(self.merged.tensors[tensor.name]))
        base = self.base.read(tensor.source.name).to(merged.dtype)
        if torch.equal(merged.reshape(-1).view(torch.uint8), base.reshape(-1).view(torch.uint8)):
            return None
        return float((merged.double() - base.double()).abs().max())

    def _check_parameter(self, tensor: OutputTensor, edit: Edit) -> TensorCheck:
        """A tensor the adapter stores whole (modules_to_save, trained biases, norm copies): its value at
        coeff, p₀ + c·(p₁ − p₀) as `scaled` sets it, vs the merged one."""
        expected = edit(self._read_base(tensor))
        unit = _unit_roundoff(self.merged.tensors[tensor.name])
        tolerance = self.atol if self.atol is not None else TOLERANCE_SIGMAS * unit * expected.abs()
        return _measure(tensor.name, "parameter", [(expected, self._read_merged(tensor.name), tolerance)])

    def _as_stored(self, state: ModuleState) -> ModuleState:
        """The state as the module stores its weight: a GPT-2 Conv1D weight is in × out, which a state of a parameter
        PEFT targets directly (target_parameters) already works in without the flag."""
        stored_transposed = self.conv1d and state.layer == "linear" and state.path.endswith(CONV1D_MODULES)
        return dataclasses.replace(state, fan_in_fan_out=True) if stored_transposed else state

    def _check_module(self, tensor: OutputTensor, edit: Edit) -> TensorCheck:
        state = self._as_stored(edit.steps[0].change.state)
        bias = self.outputs.get(tensor.name.removesuffix("weight") + "bias")
        base_weight, base_bias = self._read_base(tensor), self._expected_bias(bias)
        merged_weight = self._read_merged(tensor.name)
        merged_bias = self._read_merged(bias.name) if bias is not None and bias.name in self.merged.tensors else None
        merged = _layer(state, merged_weight, merged_bias)
        unit = _unit_roundoff(self.merged.tensors[tensor.name])
        with torch.no_grad(), ExitStack() as stack:
            reference = self._reference(stack, edit, state, base_weight, base_bias)
            batches = (
                (
                    reference(x),
                    merged(x),
                    self._tolerance(state, x, unit, (merged_weight, merged_bias), (base_weight, base_bias)),
                )
                for x in _probes(state, base_weight, self.device)
            )
            return _measure(tensor.name, "module", batches)

    def _reference(self, stack: ExitStack, edit: Edit, state: ModuleState, weight: torch.Tensor, bias: torch.Tensor | None):
        """PEFT's own forward of the composition on this module, as a function of the input.

        Each group of steps that starts from one weight runs in PEFT: adapters of one family that add up, in one
        PEFT layer with all of them active (each at its coeff under `scaled`); `sum`, as the base output plus each
        adapter's own change. A group that applies to the result of the previous one starts from the weight the
        previous group's PEFT layer computes (read off its forward on the unit inputs)."""
        groups = edit.groups()
        for i, group in enumerate(groups):
            run = self._group_forward(stack, group, state, weight, bias)
            if i == len(groups) - 1:
                return run
            weight, bias = _effective_weight(run, state, weight, bias, self.device)

    def _group_forward(self, stack: ExitStack, group: tuple[Step, ...], state: ModuleState, weight: torch.Tensor, bias):
        if len(group) == 1 or self.composition.compose == "chain":
            return self._peft_forward(stack, group, state, weight, bias)
        base = _layer(state, weight, bias)
        runs = [self._peft_forward(stack, (step,), state, weight, bias) for step in group]
        return lambda x: base(x) + sum(run(x) - base(x) for run in runs)

    def _peft_forward(self, stack: ExitStack, steps: tuple[Step, ...], state: ModuleState, weight: torch.Tensor, bias):
        """One PEFT layer around the weight, with the steps' adapters loaded, all active, each at its coeff."""
        names = [f"term{i}" for i in range(len(steps))]
        adapters = [
            _Loaded(name, self.peft_configs[s.adapter], self.adapters[s.adapter], s.change.state, self.largest[s.adapter])
            for name, s in zip(names, steps)
        ]
        model, layer = _peft_layer(adapters, state, _layer(state, weight, bias))
        coeffs = {name: s.coeff for name, s in zip(names, steps)}
        stack.enter_context(scaled(model, coeffs, scheme={name: s.scheme.name for name, s in zip(names, steps)}))
        return lambda x: layer(x, **_task_ids(self.task_id, x))

    def _expected_bias(self, bias: OutputTensor | None) -> torch.Tensor | None:
        """The bias PEFT's layer starts from: the base's, or its value at coeff where the adapter trains it."""
        if bias is None:
            return None
        stored = self._read_base(bias)
        edit = self.edits.get(bias.name)
        if edit is not None and any(s.change.part == "replace" for s in edit.steps):  # bias="all": PEFT runs the trained copy
            return edit(stored)
        return stored

    def _tolerance(self, state: ModuleState, x: torch.Tensor, unit: float, merged: tuple, base: tuple) -> torch.Tensor | float:
        """Per output: rounding of the merged weight (unit × the size of its terms) plus fp32 noise of both sides."""
        if self.atol is not None:
            return self.atol
        merged_size, base_size = _term_size(state, *merged, x), _term_size(state, *base, x)
        fan_in = 1 if state.layer == "embedding" else x.shape[-1]
        fp32_noise = math.sqrt(fan_in) * FP32_EPS
        return TOLERANCE_SIGMAS * (unit * merged_size + fp32_noise * (merged_size + base_size))


def _effective_weight(run, state: ModuleState, weight: torch.Tensor, bias: torch.Tensor | None, device: torch.device):
    """The (weight, bias) a PEFT layer computes, from its forward: the layer is affine in its input, so its
    output at 0 is the bias and at the unit vectors the weight's columns (an embedding: every row)."""
    if state.layer == "embedding":
        rows = [run(ids) for ids in torch.arange(weight.shape[0], device=device).split(EMBEDDING_CHUNK)]
        return torch.cat(rows), bias
    fan_in = weight.shape[0] if state.fan_in_fan_out else weight.shape[1]
    offset = run(torch.zeros(1, 1, fan_in, device=device))[0, 0]
    columns = run(torch.eye(fan_in, device=device)[None])[0] - offset  # in × out: the Linear weight transposed
    return (columns if state.fan_in_fan_out else columns.T).contiguous(), offset if bias is not None else None


def _measure(name: str, kind: str, batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor | float]]) -> TensorCheck:
    """Reduce (expected, got, tolerance) batches, one at a time, to one TensorCheck."""
    max_abs = max_expected = ratio = 0.0
    for expected, got, tolerance in batches:
        error = (got - expected).abs()
        max_abs = max(max_abs, float(error.max()))
        max_expected = max(max_expected, float(expected.abs().max()))
        ratio = max(ratio, float(torch.where(error == 0, 0.0, error / tolerance).max()))
    return TensorCheck(name, kind, max_abs, max_abs / max_expected if max_expected else max_abs, ratio)


def _task_ids(task_id: int | None, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Poly's forward keyword: the task of every row of `inputs`."""
    return {} if task_id is None else {"task_ids": torch.full(inputs.shape[:1], task_id, device=inputs.device)}


def _runs_as_layer(tensor: OutputTensor | None, edit: Edit | None) -> bool:
    """Is this the weight of a Linear / Conv1D / Embedding module that PEFT's layer can run?"""
    return edit is not None and all(s.change.part == "weight" for s in edit.steps) and len(tensor.shape) == 2


def _unit_roundoff(info: TensorInfo) -> float:
    return torch.finfo(info.torch_dtype).eps / 2


def _term_size(state: ModuleState, weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """sqrt(Σ_j (W_ij x_j)² + b_i²) per output: rounding errors in W and b add up to about unit × this."""
    if state.layer == "embedding":
        return weight[x].abs()
    rows = weight.T if state.fan_in_fan_out else weight  # Linear orientation, out × in
    squares = torch.cat([x.square() @ chunk.square().T for chunk in rows.split(ROW_CHUNK)], dim=-1)
    if bias is not None:
        squares += bias.square()
    return squares.sqrt()


def _probes(state: ModuleState, weight: torch.Tensor, device: torch.device) -> Iterator[torch.Tensor]:
    """Every token id of an embedding; for a linear layer, one sequence of PROBES random inputs
    (batch × seq × in, the shape some tuner layers require)."""
    if state.layer == "embedding":
        yield from torch.arange(weight.shape[0], device=device).split(EMBEDDING_CHUNK)
        return
    fan_in = weight.shape[0] if state.fan_in_fan_out else weight.shape[1]
    yield torch.randn(1, PROBES, fan_in, generator=torch.Generator().manual_seed(0)).to(device)


def _layer(state: ModuleState, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """The module the base model holds at state.path, rebuilt around the given tensors."""
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):
        if state.layer == "embedding":
            layer = nn.Embedding(*weight.shape)
        elif state.layer != "linear":
            raise UnsupportedAdapterError(f"verify cannot rebuild a {state.layer!r} layer for {state.path}.")
        elif state.fan_in_fan_out:
            layer = Conv1D(weight.shape[1], weight.shape[0])
            bias = bias if bias is not None else torch.zeros(weight.shape[1], device=weight.device)
        else:
            layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    layer.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=False)
    return layer


class _Loaded(NamedTuple):
    """One adapter to load into a lone PEFT layer."""

    name: str  # its name in the PEFT model
    config: object  # its PEFT config
    adapter: Adapter
    state: ModuleState  # the merge's state for the module: the shared tensors it uses
    largest: tuple[int, int] | None  # the largest (out, in) it adapts in the whole model


def _peft_layer(adapters: Sequence[_Loaded], state: ModuleState, layer: nn.Module) -> tuple[nn.Module, nn.Module]:
    """PEFT's own tuner layer around `layer`, loaded with each adapter's tensors for that module under its
    name, all of them active.

    Returns (the PeftModel, for `scaled`; the tuner layer, to run). The layer sits at its own path in
    an otherwise empty module tree, so PEFT's targeting rules (target_modules, layers_to_transform,
    feedforward_modules, rank/alpha patterns) see the same module name as in the full model.
    """
    from peft import get_peft_model, set_peft_model_state_dict

    container = nn.Module()
    *parents, leaf = state.path.split(".")
    parent = container
    for name in parents:
        parent.add_module(name, nn.Module())
        parent = getattr(parent, name)
    parent.add_module(leaf, layer)
    model = None
    for loaded in adapters:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT warns about the bare container: no config, no name
            if model is None:
                model = get_peft_model(container, _isolated(loaded.config, state), adapter_name=loaded.name).eval()  # no dropout
            else:
                model.add_adapter(loaded.name, _isolated(loaded.config, state))
    tuner_layer = model.base_model.model.get_submodule(state.path)
    for loaded in adapters:
        tensors = {**_module_tensors(loaded.adapter, state.path), **_shared_tensors(model, loaded)}
        try:
            result = set_peft_model_state_dict(model, tensors, adapter_name=loaded.name)
        except RuntimeError as e:  # size mismatches: the config (r, ...) disagrees with the saved tensors
            detail = str(e).strip().splitlines()[-1].strip()
            raise AdapterError(
                f"PEFT cannot load the tensors of {loaded.adapter.path} for {state.path} with its own config ({detail}); "
                "adapter_config.json does not match adapter_model.safetensors (e.g. its r)."
            ) from None
        if result.unexpected_keys:
            raise AdapterError(
                f"PEFT does not load {', '.join(result.unexpected_keys)} into the module {state.path}; "
                "the adapter file is inconsistent."
            )
        loaded.adapter.family.rederive_live(tuner_layer, loaded.name)
    model.base_model.set_adapter([loaded.name for loaded in adapters])
    model.eval()
    return model, tuner_layer


def _isolated(config, state: ModuleState):
    """The adapter's config, wrapping only this module (see ISOLATED)."""
    from peft.utils.constants import INCLUDE_LINEAR_LAYERS_SHORTHAND

    overrides = dict(ISOLATED)
    if config.target_modules == INCLUDE_LINEAR_LAYERS_SHORTHAND:  # PEFT resolves it on transformers models only
        overrides["target_modules"] = [state.path]
    fields = {f.name for f in dataclasses.fields(config)}
    return dataclasses.replace(config, **{k: v for k, v in overrides.items() if k in fields})


def _module_tensors(adapter: Adapter, path: str) -> dict[str, torch.Tensor]:
    """The adapter's saved tensors for one module: its own parameters, not replaced base tensors."""
    prefix = f"{MODEL_PREFIX}{path}."
    return {
        key: tensor
        for key, tensor in adapter.tensors.items()
        if key.startswith(prefix) and key[len(prefix) :].split(".")[0] in adapter.family.tokens
    }


def _shared_tensors(model, loaded: _Loaded) -> dict[str, torch.Tensor]:
    """The tensors the lone layer's PEFT model keeps once for all its layers, under the keys it saves them with, set
    to what the module uses in the full model.

    Alone, the layer gets its own stand-ins: projections (VeRA, PVeRA, RandLoRA) sized by this layer rather than the
    largest in the model (it uses their leading block), FRoD's basis of its role computed from this weight alone,
    TinyLoRA's group 0 (its group follows from its index among all adapted modules). The real ones are those the
    merge's state holds for the module (the saved tensor of its role or group), or, where the file lacks them
    (save_projection=False), PEFT's own draw at the model's sizes. Per-layer copies (RandLoRA saves one beside
    each layer) get the same."""
    from peft import get_peft_model_state_dict

    own = get_peft_model_state_dict(model, adapter_name=loaded.name, save_embedding_layers=False)
    layer_prefix = f"{MODEL_PREFIX}{loaded.state.path}."
    drawn: dict[str, torch.Tensor] | None = None
    shared = {}
    for key, stand_in in own.items():
        name = key.removeprefix(layer_prefix) if key.startswith(MODEL_PREFIX) else key.removeprefix(SHARED_PREFIX)
        token = name.split(".")[0]
        if token not in loaded.adapter.family.shared_tokens:
            continue
        if _saved(loaded.adapter, token):
            source = loaded.state.tensors.get(token, loaded.adapter.tensors.get(key))
        else:
            drawn = drawn if drawn is not None else _drawn_projections(model, loaded)
            source = drawn.get(token)
        if source is None:
            raise AdapterError(f"Adapter {loaded.adapter.path} lacks {key}, which PEFT's {loaded.adapter.peft_type} layer loads.")
        shared[key] = source[tuple(slice(0, n) for n in stand_in.shape)].to(stand_in.dtype)
    return shared


def _saved(adapter: Adapter, token: str) -> bool:
    """Does the adapter file hold the shared tensor `token` (base_model.<token> or one per group)?"""
    name = SHARED_PREFIX + token
    return any(key == name or key.startswith(name + ".") for key in adapter.tensors)


def _drawn_projections(model, loaded: _Loaded) -> dict[str, torch.Tensor]:
    """Shared projections saved with save_projection=False, as the full model draws them: the tuner's own
    pre-injection hook (VeraModel._init_vera_A_vera_B, ...), on a bare tuner whose `_find_dim` returns the model's
    largest adapted layer instead of searching the lone layer's container."""
    tuner_class = type(model.base_model)
    if loaded.largest is None or not hasattr(tuner_class, "_find_dim"):
        raise UnsupportedAdapterError(
            f"verify cannot rebuild the shared tensors of {loaded.adapter.path}, which were not saved "
            "(save_projection=False); re-save the adapter with save_projection=True."
        )
    drawer = tuner_class.__new__(tuner_class)
    nn.Module.__init__(drawer)
    drawer._find_dim = lambda _config: loaded.largest
    drawer._pre_injection_hook(None, loaded.config, loaded.name)
    return {token: getattr(drawer, token)[loaded.name] for token in loaded.adapter.family.shared_tokens}


def _float_dtype(checkpoint: Checkpoint) -> torch.dtype:
    """The dtype most of the checkpoint's floating-point bytes are stored in."""
    sizes: Counter[str] = Counter()
    for info in checkpoint.tensors.values():
        if info.dtype in FLOAT_CODES:
            sizes[info.dtype] += info.nbytes
    return DTYPES[sizes.most_common(1)[0][0]]


# ---- model level ---------------------------------------------------------------------------------


def _compare_logits(
    base: Path,
    adapters: Sequence[Adapter],
    composition: Composition,
    merged: Path,
    options: dict,
    prompts: Sequence[Prompt] | None,
    atol: float,
    dtype: torch.dtype,
) -> LogitsCheck:
    from peft import PeftModel

    _check_one_peft_model(adapters, composition)
    names = [f"term{i}" for i in range(len(composition.terms))]
    paths = [adapters[t.adapter].path for t in composition.terms]
    with torch.no_grad():
        unmerged = PeftModel.from_pretrained(_load_model(base, dtype), paths[0], adapter_name=names[0])
        for name, path in zip(names[1:], paths[1:]):
            unmerged.load_adapter(path, adapter_name=name)
        unmerged.base_model.set_adapter(names)
        unmerged.eval()
        inputs = _encode_prompts(merged, prompts, unmerged.get_input_embeddings().weight.shape[0])
        tuner = unmerged.base_model  # LoraModel, PolyModel, ...: it hands task_ids (Poly) on to its layers
        coeffs = {name: t.coeff for name, t in zip(names, composition.terms)}
        with scaled(unmerged, coeffs, scheme={name: t.scheme.name for name, t in zip(names, composition.terms)}):
            expected = [_run(tuner, ids, **_task_ids(options.get("task_id"), ids[None])) for ids in inputs]
        del unmerged, tuner  # one model in memory at a time
        merged_model = _load_model(merged, dtype).eval()
        got = [_run(merged_model, ids) for ids in inputs]
    return _logits_check(expected, got, atol)


def _check_one_peft_model(adapters: Sequence[Adapter], composition: Composition) -> None:
    """The logits check runs the terms in one PeftModel: one PEFT type whose adapters add up there."""
    if len(composition.terms) == 1:
        return
    types = {adapters[t.adapter].peft_type for t in composition.terms}
    family = adapters[composition.terms[0].adapter].family
    if len(types) > 1 or not family.composes_additively:
        raise VerificationError(
            f"--logits runs a composition as one PeftModel with every adapter active, which matches the merge for "
            f"adapters of one additive family (LoRA, DeLoRA, VeRA, ...); these are {', '.join(sorted(types))}. "
            "The module-level check (without --logits) covers every composition."
        )


@contextmanager
def _loading_bars(enabled: bool) -> Iterator[None]:
    """transformers' "Loading weights" bars, off unless progress was asked for."""
    from transformers.utils import logging

    if enabled or not logging.is_progress_bar_enabled():
        yield
        return
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.enable_progress_bar()


def _load_model(path: Path, dtype: torch.dtype):
    """The class config.json `architectures` names (causal LM, seq2seq, classifier, image-text-to-text, ...);
    AutoModelForCausalLM where transformers does not know it (remote code)."""
    from transformers import AutoModelForCausalLM

    from .anatomy import model_class

    placement = {"device_map": "auto"} if torch.cuda.is_available() else {}  # spread a big model over the GPUs
    cls = model_class(json.loads((path / "config.json").read_text())) or AutoModelForCausalLM
    return cls.from_pretrained(path, dtype=dtype, **placement)


def _run(model, ids: torch.Tensor, **forward_kwargs) -> Run:
    """(logits at every prompt position, greedy continuation)."""
    from transformers import GenerationConfig

    ids = ids.to(model.device)[None]
    forward_kwargs = {k: v.to(model.device) for k, v in forward_kwargs.items()}
    decoder = {"decoder_input_ids": ids} if getattr(model.config, "is_encoder_decoder", False) else {}  # the prompt, teacher-forced
    logits = model(input_ids=ids, **decoder, **forward_kwargs).logits[0].float().cpu()
    if logits.dim() == 1:  # a sequence classifier: one row of class logits per prompt
        logits = logits[None]
    if not model.can_generate():  # classifiers, encoders: logits only
        return logits, []
    eos = model.generation_config.eos_token_id
    pad = (eos[0] if isinstance(eos, list) and eos else eos) or 0
    greedy = GenerationConfig(do_sample=False, max_new_tokens=GREEDY_TOKENS, eos_token_id=eos, pad_token_id=pad)
    generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=greedy, **forward_kwargs)
    return logits, generated[0, ids.shape[1] :].tolist()


def _logits_check(expected: list[Run], got: list[Run], atol: float) -> LogitsCheck:
    reference = torch.cat([logits for logits, _ in expected])
    merged = torch.cat([logits for logits, _ in got])
    p_log, q_log = reference.double().log_softmax(-1), merged.double().log_softmax(-1)
    kl = (p_log.exp() * (p_log - q_log)).sum(-1).clamp_min(0)  # ≥ 0 up to rounding
    agreements = [_shared_prefix(a, b) / max(len(a), len(b)) if a or b else 1.0 for (_, a), (_, b) in zip(expected, got)]
    return LogitsCheck(
        positions=reference.shape[0],
        max_abs=float((reference - merged).abs().max()),
        kl_mean=float(kl.mean()),
        kl_p95=float(torch.quantile(kl, 0.95)),
        top1_agreement=float((reference.argmax(-1) == merged.argmax(-1)).float().mean()),
        greedy_agreement=sum(agreements) / len(agreements),
        atol=atol,
    )


def _shared_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _encode_prompts(merged: Path, prompts: Sequence[Prompt] | None, vocab_size: int) -> list[torch.Tensor]:
    tokenizer, why_not = _tokenizer(merged)
    if prompts is None:
        generator = torch.Generator().manual_seed(0)
        random_ids = torch.randint(vocab_size, (DEFAULT_ID_PROMPTS, DEFAULT_ID_LENGTH), generator=generator).tolist()
        prompts = DEFAULT_PROMPTS if tokenizer is not None else random_ids
    encoded = [_encode(p, tokenizer, why_not, merged) for p in prompts]
    for ids in encoded:
        if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
            raise VerificationError(f"Prompts must be non-empty with token ids in 0 … {vocab_size - 1}; got {ids.tolist()}.")
    return encoded


def _encode(prompt: Prompt, tokenizer, why_not: str | None, merged: Path) -> torch.Tensor:
    if not isinstance(prompt, str):
        return torch.tensor(list(prompt), dtype=torch.long)
    if tokenizer is not None:
        return tokenizer(prompt, return_tensors="pt").input_ids[0]
    try:
        return torch.tensor([int(t) for t in prompt.replace(",", " ").split()], dtype=torch.long)
    except ValueError:
        raise VerificationError(
            f"{merged} has no usable tokenizer ({why_not}), so prompts must be token ids, e.g. '1 5 9 17'; got {prompt!r}."
        ) from None


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path), None
    except Exception as e:  # a missing or broken tokenizer raises many types; token-id prompts still work
        return None, f"{type(e).__name__}: {e}"

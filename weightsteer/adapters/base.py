"""What every adapter family provides, and the coeff-scheme machinery they share.

An adapter family (one module in this package) turns PEFT's saved tensors into `ModuleState`s,
one per adapted module, and gives the closed-form weight (and bias) that PEFT's forward computes
from such a state. A `Scheme` maps a state at strength 1 to the state at strength c. The merge
applies `family.weight(scheme(state, c), W)`; the runtime context manager writes
`scheme(state, c)` into the live PEFT layer. Both use the same scheme function, so "merged at c"
and "unmerged at c" cannot drift apart.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable, ClassVar, Iterable, Mapping

import torch

from ..errors import AdapterError, SchemeError, UnsupportedAdapterError

if TYPE_CHECKING:
    from ..names import CheckpointNames, ModelParameter, StoredSlice

MODEL_PREFIX = "base_model.model."
SHARED_PREFIX = "base_model."


@dataclass
class ModuleState:
    """One adapted module: the adapter tensors PEFT stores for it (fp32) and its scalar settings."""

    path: str
    tensors: dict[str, torch.Tensor]
    scalars: dict[str, float] = field(default_factory=dict)
    # "linear" (W is out×in), "embedding" (W is vocab×dim), "parameter" (a parameter PEFT targets directly with
    # target_parameters: `path` names the parameter, e.g. an MoE expert stack) or "experts" (W is experts×out×in)
    layer: str = "linear"
    fan_in_fan_out: bool = False  # the base tensor is stored transposed (GPT-2 Conv1D)

    def with_tensors(self, **tensors: torch.Tensor) -> "ModuleState":
        return replace(self, tensors={**self.tensors, **tensors})

    def with_scalars(self, **scalars: float) -> "ModuleState":
        return replace(self, scalars={**self.scalars, **scalars})


SchemeFn = Callable[[ModuleState, float], ModuleState]


@dataclass(frozen=True)
class Scheme:
    """A way to read coeff c: a map from the trained state to the state at c.

    `apply` is None for `delta`, which is defined on whole weights (W + c(W₁ − W)) rather than on
    adapter parameters.
    """

    name: str
    formula: str
    meaning: str  # what c = 0, 1, −1 give
    apply: SchemeFn | None
    base_at_zero: bool = True
    interpolates_replacements: bool = True  # tensors stored whole: t₀ + c(t₁ − t₀), else kept as trained


DELTA = Scheme(
    "delta",
    "W + c·(W₁ − W)",
    "0: base · 1: trained · −1: base − (W₁ − W)",
    None,
)


def linear_from(identity: float, c: float, value: torch.Tensor) -> torch.Tensor:
    """p(c) = p_id + c·(p − p_id): move a parameter linearly away from its no-op value."""
    return identity + c * (value - identity)


def toward(base: torch.Tensor, trained: torch.Tensor, mix: float) -> torch.Tensor:
    """base + mix·(trained − base), and the trained tensor itself at mix = 1 (bit for bit)."""
    if mix == 1.0:
        return trained
    return base + mix * (trained - base)


def scale_scaling(state: ModuleState, c: float) -> ModuleState:
    """The linear scheme for W + scaling·ΔW: scaling → c·scaling (its no-op value is 0)."""
    return state.with_scalars(scaling=c * state.scalars["scaling"])


def scale_mix(state: ModuleState, c: float) -> ModuleState:
    """The linear scheme for stored-whole tensors: mix → c·mix (mix = 1 as trained)."""
    return state.with_scalars(mix=c * state.scalars["mix"])


class AdapterFamily:
    """Base class for one PEFT adapter family. Subclasses fill in the class attributes and methods."""

    name: ClassVar[str]
    peft_types: ClassVar[tuple[str, ...]]
    tokens: ClassVar[tuple[str, ...]]  # parameter names in saved keys, e.g. ("lora_A", "lora_B")
    shared_tokens: ClassVar[tuple[str, ...]] = ()  # tensors saved once at base_model.<name>
    nested: ClassVar[bool] = False  # tensors live inside sub-modules (`<token>.0.weight`): see split_keys
    schemes: ClassVar[dict[str, Scheme]]
    knobs: ClassVar[tuple[str, ...]] = ()  # scalars that `knob:<name>` may scale besides tensors
    options: ClassVar[tuple[str, ...]] = ()  # merge options the family reads, e.g. ("task_id",)
    # Several adapters of this family active in one PEFT model add their changes, each computed against the
    # same weight (LoRA: W + Σ ΔWᵢ). False where PEFT's forward applies them one after another (IA3
    # multiplies its scalings; rotations compose), so a composition chains them.
    composes_additively: ClassVar[bool] = True

    # ---- parsing -------------------------------------------------------------------------------
    def parse(
        self, config: dict, tensors: Mapping[str, torch.Tensor], base_shapes: "ShapeLookup", options: Mapping[str, object]
    ) -> list[ModuleState]:
        """One state per adapted module. options: user choices such as {"task_id": 2} (Poly)."""
        raise NotImplementedError

    def refusal(self, config: dict) -> str | None:
        """Why this adapter_config.json cannot be merged (a setting PEFT's forward makes input-dependent, or that the
        saved file lacks what the merge needs), or None. Checked before parsing, and by `inspect`."""
        return None

    def tied_head_follows(self, config: dict) -> bool:
        """With tied embeddings, does PEFT's forward apply the embedding's change to the head as well?"""
        return bool(config.get("ensure_weight_tying"))

    # ---- closed form ---------------------------------------------------------------------------
    def weight(self, state: ModuleState, weight: torch.Tensor) -> torch.Tensor:
        """The merged weight PEFT's forward computes, in Linear orientation, fp32."""
        raise NotImplementedError

    def bias(self, state: ModuleState, bias: torch.Tensor) -> torch.Tensor:
        return bias

    def low_rank(self, state: ModuleState, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Exact factors (B, A) with ΔW = B A in Linear orientation for a weight of this shape, where the
        family's change is a product of small factors; None otherwise (LoRA export then uses an SVD)."""
        return None

    def changes_bias(self, state: ModuleState) -> bool:
        return False

    def changes_weight(self, state: ModuleState) -> bool:
        """False for a change that only touches the bias (BEFT, a steering vector): the weight is copied, not recomputed."""
        return True

    def adds_bias(self, state: ModuleState) -> bool:
        """True where the change creates a bias the base module lacks (a steering vector): the planner writes it as
        a new tensor, bias(state, zeros). False (default): a bias changes only where the base has one."""
        return False

    def check_shapes(self, state: ModuleState, weight_shape: tuple[int, ...], bias_shape: tuple[int, ...] | None) -> None:
        """Raise AdapterError if the module's tensors cannot apply to a base weight of this shape."""

    def slice_state(self, state: ModuleState, stored: "StoredSlice") -> ModuleState:
        """For a layer="parameter" state: the state that changes one stored tensor, the slice `stored` of the
        parameter (an expert's gate half of a fused gate_up_proj, say), in the stored tensor's orientation."""
        raise UnsupportedAdapterError(f"{self.name} adapters do not target parameters directly ({state.path}).")

    # ---- runtime twin --------------------------------------------------------------------------
    def live_state(self, layer: torch.nn.Module, adapter: str, path: str) -> ModuleState:
        raise NotImplementedError

    def set_live_state(self, layer: torch.nn.Module, adapter: str, state: ModuleState) -> None:
        raise NotImplementedError

    def rederive_live(self, layer: torch.nn.Module, adapter: str) -> None:
        """Recompute what a live PEFT layer derives at init from tensors loaded into it afterwards (FRoD: U from its
        role's basis). verify builds each layer alone, where PEFT derives them from stand-ins, then loads the real ones."""

    def check_live_delta(self, layer: torch.nn.Module, adapter: str) -> None:
        """Raise SchemeError if the runtime `delta` (y_base + c(y − y_base)) would not match the merge for this
        layer, e.g. because PEFT changed the live base weight at load (KaSA)."""

    # ---- schemes -------------------------------------------------------------------------------
    def scheme(self, name: str | None) -> Scheme:
        name = name or "linear"
        if name == "delta":
            return DELTA
        if name.startswith("knob:"):
            return self._knob(name[len("knob:") :])
        if name not in self.schemes:
            available = ", ".join([*self.schemes, "delta", *(f"knob:{k}" for k in self.knob_names())])
            raise SchemeError(f"{self.name} has no coeff scheme {name!r}. Available: {available}.")
        return self.schemes[name]

    def knob_names(self) -> tuple[str, ...]:
        return (*self.tokens, *self.knobs)

    def _knob(self, knob: str) -> Scheme:
        if knob not in self.knob_names():
            raise SchemeError(
                f"{self.name} has no parameter {knob!r} to multiply by c. Parameters: {', '.join(self.knob_names())}."
            )

        def apply(state: ModuleState, c: float) -> ModuleState:
            if knob in state.scalars:
                return state.with_scalars(**{knob: state.scalars[knob] * c})
            if knob in state.tensors:
                return state.with_tensors(**{knob: state.tensors[knob] * c})
            return state

        return Scheme(
            f"knob:{knob}",
            f"{knob} → c·{knob}",
            "what PEFT computes with this one parameter multiplied by c; other tensors stay as trained",
            apply,
            base_at_zero=False,
            interpolates_replacements=False,
        )

    def scheme_rows(self) -> Iterable[Scheme]:
        yield from self.schemes.values()
        yield DELTA


class LowRankChange:
    """For a family whose change is a product of small factors: weight() adds the `low_rank` factors' product,
    W + L R, in one fused addmm (so the merge, export-lora and the row-block engine share one formula)."""

    def weight(self, state: ModuleState, weight: torch.Tensor) -> torch.Tensor:
        return torch.addmm(weight, *self.low_rank(state, tuple(weight.shape)))


class ShapeLookup:
    """Shapes of base tensors, by module path, for families that size things from the base.

    `names` (weightsteer.names.CheckpointNames) maps model paths to stored names as the planner does; without
    it, a stored name that shares the path's suffix is taken. `config` is the base's config.json, for formats that
    depend on the architecture (steering vectors). `read` (stored name → tensor) gives the data, for the few
    families whose layout PEFT derives from the base weights at load (AdaMSS's subspaces)."""

    def __init__(
        self,
        shapes: Mapping[str, tuple[int, ...]],
        names: "CheckpointNames | None" = None,
        config: Mapping[str, object] | None = None,
        read: Callable[[str], torch.Tensor] | None = None,
    ):
        self.shapes = shapes
        self.names = names
        self.config = config or {}
        self.read = read

    def weight(self, path: str) -> tuple[int, ...] | None:
        """The base weight's stored shape."""
        stored = self._stored(path + ".weight")
        return self.shapes[stored] if stored is not None else None

    def tensor(self, name: str) -> torch.Tensor | None:
        """A base tensor by model-side name (`<path>.weight`, `<path>.bias`), fp32 as stored; None if the base has none."""
        stored = self._stored(name)
        if stored is None:
            return None
        if self.read is None:
            raise AdapterError(f"Adapter needs the data of the base tensor {name}, not only its shape.")
        return self.read(stored).float()

    def _stored(self, name: str) -> str | None:
        if self.names is not None:
            return self.names.find(name)
        if name in self.shapes:
            return name
        candidates = [n for n in self.shapes if name.endswith("." + n) or n.endswith("." + name)]
        return candidates[0] if len(candidates) == 1 else None

    def parameters(self, module: str) -> "dict[str, ModelParameter]":
        """The model's own parameters of a module, in definition order (for target_parameters adapters)."""
        if self.names is None:
            raise AdapterError(f"Adapter targets parameters of {module} directly; that needs the base model's layout.")
        return self.names.parameters(module)


# ---- helpers shared by the family modules -----------------------------------------------------


def split_keys(
    tensors: Mapping[str, torch.Tensor], tokens: Iterable[str], shared_tokens: Iterable[str] = (), *, nested: bool = False
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Sort saved adapter keys into (per-module params, replacement tensors, shared tensors).

    `base_model.model.<path>.<token>[.weight|.bias]` → modules[path][token or token.bias];
    with nested=True (adapter tensors inside sub-modules, e.g. `<token>.0.weight`), the whole saved name
    after the path is kept: modules[path]["<token>.0.weight"], the names `live_tensors` gives.
    `base_model.<shared>[.<group>]` → shared; any other key names a base tensor the adapter replaces
    (modules_to_save, trained biases, saved embeddings): `.base_layer` is dropped from its name.
    """
    rest = r"(\..+)?" if nested else r"(\.[^.]+)?"
    token_re = re.compile(r"^(?P<path>.+?)\.(?P<token>" + "|".join(map(re.escape, tokens)) + r")(?P<rest>" + rest + r")$")
    shared_tokens = tuple(shared_tokens)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    replacements: dict[str, torch.Tensor] = {}
    shared: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        # base_model.<shared> or base_model.<shared>.<key> (FRoD, TinyLoRA: one tensor per group)
        if key.startswith(SHARED_PREFIX) and not key.startswith(MODEL_PREFIX) and key[len(SHARED_PREFIX) :].split(".")[0] in shared_tokens:
            shared[key[len(SHARED_PREFIX) :]] = tensor
            continue
        if not key.startswith(MODEL_PREFIX):
            raise AdapterError(f"Adapter tensor {key!r} does not start with {MODEL_PREFIX!r}; is this a PEFT adapter?")
        name = key[len(MODEL_PREFIX) :]
        match = token_re.match(name)
        if match is None:
            replacements[name.replace(".base_layer.", ".")] = tensor
            continue
        if nested:
            param = match["token"] + match["rest"]
        else:
            param = match["token"] + (".bias" if match["rest"] == ".bias" else "")
        modules.setdefault(match["path"], {})[param] = tensor
    return modules, replacements, shared


def pattern_value(patterns: Mapping[str, object] | None, path: str, default):
    """PEFT's rank/alpha pattern lookup: the first key (in stored order) whose regex matches the end of path."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def require(tensors: Mapping[str, torch.Tensor], path: str, *names: str) -> None:
    missing = [n for n in names if n not in tensors]
    if missing:
        raise AdapterError(f"Adapter module {path} lacks {', '.join(missing)}; the adapter file is incomplete.")


def shape_error(path: str, what: str, expected: object, found: object) -> AdapterError:
    return AdapterError(
        f"Adapter module {path}: {what} — the adapter expects {expected} but the base has {found}. "
        "Is --base the model this adapter was trained on?"
    )


def finite(value: float, what: str) -> float:
    if not math.isfinite(value):
        raise SchemeError(f"{what} must be a finite number, got {value}.")
    return value


def live_tensors(layer: torch.nn.Module, adapter: str, tokens: Iterable[str]) -> dict[str, torch.Tensor]:
    """A live PEFT layer's adapter tensors under the names PEFT saves them with (the adapter name dropped):
    `hira_A` for a ParameterDict/BufferDict entry, `peanut_A.weight` or `glora_A.Xd` inside a ModuleDict entry."""
    found = {}
    for token in tokens:
        container = getattr(layer, token, None)
        if container is None or adapter not in container:
            continue
        entry = container[adapter]
        if isinstance(entry, torch.Tensor):
            found[token] = entry
        else:
            found.update({f"{token}.{name}": p for name, p in entry.named_parameters()})
    return found


def scale_tensors(*names: str) -> SchemeFn:
    """The linear scheme for a change linear in these tensors (no-op value 0): t → c·t."""

    def apply(state: ModuleState, c: float) -> ModuleState:
        return state.with_tensors(**{n: c * t for n, t in state.tensors.items() if n.split(".")[0] in names})

    return apply

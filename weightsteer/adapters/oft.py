"""OFT: block-diagonal orthogonal rotations of the layer input (PEFT ≥ 0.14 layout).

PEFT forward (peft/tuners/oft/layer.py, OFTRotationModule.forward / _cayley_batch):
  Linear     y = W (Rᵀ x) + b          Embedding   e = E[t] R          R = blockdiag(R_1 … R_{in/b})
  Q_k        skew b×b from row k of oft_R (upper triangle filled row-major, minus its transpose);
             one row for all blocks with block_share; coft projects every row onto a ball of radius
             eps/√rows at every forward.
  R_k        use_cayley_neumann (default): I + 2Q + 2Q² + … + 2Q^{n−2} + Q^{n−1}, a truncation of (I+Q)(I−Q)⁻¹;
             exact: (I−Q)(I+Q)⁻¹ — the transpose of the series' limit, so the two flags rotate in
             opposite directions.
Merged: W' = W Rᵀ, E' = E R (per block); bias unchanged.
"""

from __future__ import annotations

import math

import torch

from ..errors import AdapterError, UnsupportedAdapterError
from .base import AdapterFamily, ModuleState, Scheme, require, shape_error, split_keys
from .orthogonal import HookFactory, cayley, real_power, replace_hook, rotate_blocks

LINEAR, EMBEDDING = "oft_R", "oft_embedding_R"
# Beyond this, the Q that makes PEFT's Cayley map give R^c is so large that its fp32 solve loses accuracy.
LIVE_Q_LIMIT = 100.0


def _linear(state: ModuleState, c: float) -> ModuleState:
    # PEFT's knob oft_R·c, applied to the rows PEFT's forward uses (coft-projected once, then not again).
    return state.with_tensors(**{_name(state): c * _effective_rows(state)}).with_scalars(coft=0.0)


def _power(state: ModuleState, c: float) -> ModuleState:
    return state.with_tensors(**{_name(state): _effective_rows(state)}).with_scalars(coft=0.0, power=c)


class OFT(AdapterFamily):
    name = "OFT"
    peft_types = ("OFT",)
    composes_additively = False  # PEFT applies several of them one after another
    tokens = (LINEAR, EMBEDDING)
    schemes = {
        "linear": Scheme(
            "linear",
            "Q → c·Q (oft_R·c)",
            "0: base · 1: trained · −1: R(−Q) = Rᵀ (the exact inverse only with use_cayley_neumann=False)",
            _linear,
        ),
        "power": Scheme(
            "power",
            "R → R^c per block (principal power)",
            "0: base · 1: trained · −1: exact inverse R⁻¹ (group: c₁ then c₂ = c₁ + c₂)",
            _power,
        ),
    }

    def parse(self, config, tensors, base_shapes, options):
        if "oft_block_size" not in config:
            raise UnsupportedAdapterError(
                "This OFT adapter predates PEFT 0.14 (its config has no oft_block_size): its weights use the old OFT "
                "parametrisation, which current PEFT refuses to load. Merge it with peft<=0.13 (merge_and_unload) "
                "or retrain it with a current PEFT."
            )
        modules, _, _ = split_keys(tensors, self.tokens)
        return [self._state(config, path, params) for path, params in modules.items()]

    def _state(self, config: dict, path: str, params: dict[str, torch.Tensor]) -> ModuleState:
        name = EMBEDDING if EMBEDDING in params else LINEAR
        require(params, path, name)
        rows = params[name]
        scalars = {
            "block_size": float(_block_size(path, rows)),
            "neumann": float(bool(config.get("use_cayley_neumann", True))),
            "terms": float(config.get("num_cayley_neumann_terms", 5)),
            "coft": float(bool(config.get("coft", False))),
            "eps": float(config.get("eps", 6e-5)),
        }
        return ModuleState(path, {name: rows}, scalars, layer="embedding" if name == EMBEDDING else "linear")

    def check_shapes(self, state, weight_shape, bias_shape):
        if len(weight_shape) != 2:
            raise UnsupportedAdapterError(
                f"OFT module {state.path}: OFT on a {len(weight_shape)}-d (convolution) weight is not supported."
            )
        size = int(state.scalars["block_size"])
        rows = state.tensors[_name(state)].shape[0]
        dim = weight_shape[1]
        if dim % size or rows not in (1, dim // size):
            expected = rows * size if rows > 1 else f"a multiple of {size}"
            raise shape_error(state.path, f"rotated dimension ({rows} block(s) of size {size})", expected, dim)

    def weight(self, state, weight):
        blocks = _rotations(state).to(weight.dtype)
        return rotate_blocks(weight, blocks if state.layer == "embedding" else blocks.mT)

    # ---- runtime ---------------------------------------------------------------------------------
    def live_state(self, layer, adapter, path):
        module = _rotation_module(layer, adapter)
        scalars = {
            "block_size": float(module.block_size),
            "neumann": float(module.use_cayley_neumann),
            "terms": float(module.num_cayley_neumann_terms),
            "coft": float(module.coft),
            "eps": float(module.eps),
        }
        state = ModuleState(path, {}, scalars, layer="embedding" if adapter in layer.oft_embedding_R else "linear")
        return state.with_tensors(**{_name(state): module.weight.detach().clone()})

    def set_live_state(self, layer, adapter, state):
        module = _rotation_module(layer, adapter)
        module.coft = bool(state.scalars["coft"])
        rows, hook = state.tensors[_name(state)], None
        if state.scalars.get("power", 1.0) != 1.0:
            rows, hook = _live_power(state)
        module.weight.data.copy_(rows)
        replace_hook(module, adapter, hook)


def _name(state: ModuleState) -> str:
    return EMBEDDING if state.layer == "embedding" else LINEAR


def _rotation_module(layer: torch.nn.Module, adapter: str) -> torch.nn.Module:
    return layer.oft_embedding_R[adapter] if adapter in layer.oft_embedding_R else layer.oft_R[adapter]


def _block_size(path: str, rows: torch.Tensor) -> int:
    """b from the row length b(b−1)/2 (PEFT may have adjusted the configured block size per layer)."""
    length = rows.shape[-1] if rows.dim() == 2 else -1
    size = (1 + math.isqrt(1 + 8 * length)) // 2 if length > 0 else 0
    if size * (size - 1) // 2 != length:
        raise AdapterError(
            f"OFT module {path}: oft_R has shape {tuple(rows.shape)}; each row must hold the b(b−1)/2 entries of a "
            "skew-symmetric b×b block. The adapter file is damaged or not an OFT adapter."
        )
    return size


def _skew(rows: torch.Tensor, size: int) -> torch.Tensor:
    """Row k → Q_k: upper triangle filled row-major, minus its transpose (PEFT `_pytorch_skew_symmetric`)."""
    i, j = torch.triu_indices(size, size, 1, device=rows.device)
    upper = rows.new_zeros(rows.shape[0], size, size)
    upper[:, i, j] = rows
    return upper - upper.mT


def _effective_rows(state: ModuleState) -> torch.Tensor:
    """The rows PEFT's forward uses: with coft, each projected onto the ball ‖Q_k‖_F ≤ eps/√rows (_project_batch)."""
    rows = state.tensors[_name(state)]
    if not state.scalars["coft"]:
        return rows
    radius = state.scalars["eps"] / math.sqrt(rows.shape[0])
    norm = math.sqrt(2) * torch.linalg.norm(rows, dim=1, keepdim=True)  # ‖Q_k‖_F: each entry appears twice
    return torch.where(norm <= radius, rows, radius * rows / norm)


def _neumann(q: torch.Tensor, terms: int) -> torch.Tensor:
    """PEFT ≥ 0.18's series for n terms, as its loop computes it: I + 2Q (+ 2Q² + … + 2Q^{n−2} + Q^{n−1}).

    n = 1 gives I, n = 2 gives I + 2Q, and n = 3 gives I + 2Q + 2Q² + Q³ (the same as n = 4).
    """
    result = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device).expand_as(q).clone()
    if terms <= 1:
        return result
    if terms == 2:
        return result + 2 * q
    coefficients = [2.0] * max(terms - 2, 2) + [1.0]
    power = q
    for coefficient in coefficients:
        result = result + coefficient * power
        power = power @ q
    return result


def _rotations(state: ModuleState) -> torch.Tensor:
    """The blocks R_k (float64), raised to the state's power."""
    q = _skew(_effective_rows(state).double(), int(state.scalars["block_size"]))
    blocks = _neumann(q, int(state.scalars["terms"])) if state.scalars["neumann"] else cayley(q)[0]
    power = state.scalars.get("power", 1.0)
    if power == 1.0:
        return blocks
    refusal = (
        f"OFT module {state.path}: a Cayley–Neumann block has an eigenvalue on the negative real axis (the "
        f"truncated series is far from a rotation there), so R^{power:g} has no real value. Use an integer coeff "
        "or --scheme linear."
    )
    return real_power(blocks, power, refusal)


def _live_power(state: ModuleState) -> tuple[torch.Tensor, HookFactory | None]:
    """The live layer's rows and hook that make its forward compute R^c.

    Exact Cayley: the map is its own inverse, so Q_c = (I − R^c)(I + R^c)⁻¹ gives back R^c through PEFT's own
    forward, unless R^c has an eigenvalue at (or near) −1. The Cayley–Neumann series cannot reach R^c in
    general (its image is a curve of eigenvalues p(iθ), R^c's eigenvalues p(iθ)^c leave it); there, and in the
    eigenvalue −1 case, a hook replaces the rotation module's output x·R by x·R^c.
    """
    blocks = _rotations(state)
    if not state.scalars["neumann"]:
        q, ok = cayley(blocks)
        if ok and q.abs().max() <= LIVE_Q_LIMIT:
            i, j = torch.triu_indices(q.shape[-1], q.shape[-1], 1, device=q.device)
            return (0.5 * (q - q.mT))[:, i, j].float(), None
    rotation = blocks.float()

    def hook(module, args, output):
        return rotate_blocks(args[0].to(rotation.dtype), rotation).to(output.dtype)

    return state.tensors[_name(state)], lambda module: module.register_forward_hook(hook)

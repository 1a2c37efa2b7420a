"""RoAd: a scaled 2-D rotation on each pair of outputs of a layer.

PEFT forward (peft/tuners/road/layer.py, `_prepare_cols` and `_apply_road`): the out features split into
groups of g; inside a group, output j (first half) pairs with j + g/2 =: j + h. With f = α cos θ and
s = α sin θ per element,
  y'_j   = f_j y_j − s_j y_{j+h}
  y'_{j+h} = f_{j+h} y_{j+h} + s_{j+h} y_j,        i.e. the 2×2 block [[f_j, −s_j], [s_{j+h}, f_{j+h}]].
road_1 stores one (θ, α) per pair (a scaled rotation), road_2 one per element, road_4 separate (θ, α) for
f and s. Since y = R(W x + b), the merge is W' = R W, b' = R b; R is applied pair by pair, never built.
"""

from __future__ import annotations

import math

import torch

from ..errors import AdapterError, SchemeError, UnsupportedAdapterError
from .base import AdapterFamily, ModuleState, Scheme, linear_from, require, shape_error, split_keys

THETA, ALPHA = "road_theta", "road_alpha"
VARIANTS = {"road_1": 1, "road_2": 2, "road_4": 4}  # the number is how many parameters each output pair has
PARAMS_PER_OUTPUT = {1: 0.5, 2: 1, 4: 2}  # variant road_k → len(road_theta) / out_features


# ---- schemes ------------------------------------------------------------------------------------


def _linear(state: ModuleState, c: float) -> ModuleState:
    """α → 1 + c(α − 1), θ → c·θ: c = 0 gives f = 1, s = 0 (the base) for every variant."""
    return state.with_tensors(**{ALPHA: linear_from(1.0, c, state.tensors[ALPHA]), THETA: c * state.tensors[THETA]})


def _strength(state: ModuleState, c: float) -> ModuleState:
    """α → 1 + c(α − 1), θ kept: only the scaling part moves; c = 0 leaves the pure rotations."""
    return state.with_tensors(**{ALPHA: linear_from(1.0, c, state.tensors[ALPHA])})


def _power(state: ModuleState, c: float) -> ModuleState:
    """R → R^c, block by block, written back as (θ, α) of the same variant so PEFT's layer can run it."""
    if _variant(state) == 1:
        return _rotation_power(state, c)
    f, s = _columns(state)
    blocks = _blocks(f.double(), s.double(), _half(state))
    f_c, s_c = _from_blocks(*_block_power(*blocks, c, state.path), _half(state))
    theta, alpha = torch.atan2(s_c, f_c), torch.hypot(f_c, s_c)  # f = α cos θ, s = α sin θ per element
    if _variant(state) == 4:  # per group: [θ for f (g values), θ for s (g values)], the same for α
        group = int(state.scalars["group_size"])
        theta, alpha = (torch.stack([v.reshape(-1, group)] * 2, dim=1).flatten() for v in (theta, alpha))
    dtype = state.tensors[THETA].dtype
    return state.with_tensors(**{THETA: theta.to(dtype), ALPHA: alpha.to(dtype)})


def _rotation_power(state: ModuleState, c: float) -> ModuleState:
    """road_1: each block is α·Rot(θ), the complex number α e^{iθ}; its power is α^c e^{icθ}.
    A negative α is |α| e^{i(θ+π)}, which keeps every power real."""
    alpha, theta = state.tensors[ALPHA], state.tensors[THETA]
    if c < 0 and bool((alpha == 0).any()):
        raise SchemeError(
            f"RoAd module {state.path}: road_alpha has entries equal to 0, so the rotation cannot be inverted "
            f"(coeff {c:g}). Use coeff ≥ 0 or --scheme linear."
        )
    theta = torch.where(alpha < 0, theta + math.pi, theta)
    return state.with_tensors(**{ALPHA: alpha.abs().pow(c), THETA: c * theta})


def _block_power(
    a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor, power: float, path: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """[[a, b], [c, d]]^power for a batch of real 2×2 blocks (float64)."""
    det = a * d - b * c
    if float(power).is_integer():
        if power < 0 and bool((det == 0).any()):
            raise SchemeError(
                f"RoAd module {path}: {int((det == 0).sum())} of its 2×2 blocks are singular, so the layer cannot be "
                f"inverted (coeff {power:g}). Use coeff ≥ 0 or --scheme linear."
            )
        result = torch.linalg.matrix_power(torch.stack([a, b, c, d], -1).reshape(-1, 2, 2), int(power))
        return result[:, 0, 0], result[:, 0, 1], result[:, 1, 0], result[:, 1, 1]
    # M^p = P·I + Q·(M − μI), μ = tr/2, eigenvalues μ ± √disc, disc = μ² − det (Sylvester for 2×2).
    mu = (a + d) / 2
    disc = ((a - d) / 2) ** 2 + b * c
    root = disc.clamp(min=0).sqrt()
    no_real_power = (disc >= 0) & (mu - root <= 0)
    if bool(no_real_power.any()):
        raise SchemeError(
            f"RoAd module {path}: {int(no_real_power.sum())} of its 2×2 blocks have a real eigenvalue ≤ 0 and no real power {power:g}. "
            "Use an integer coeff or --scheme linear."
        )
    scale = det.pow(power / 2)  # (λ₊λ₋)^{p/2} = |λ|^p
    # Complex eigenvalues √det·e^{±iφ}: P = |λ|^p cos pφ, Q = |λ|^p sin(pφ)/ω, ω = √−disc.
    omega = (-disc).clamp(min=0).sqrt()
    phi = torch.atan2(omega, mu)
    complex_p, complex_q = scale * torch.cos(power * phi), scale * torch.sin(power * phi) / omega
    # Real eigenvalues λ± = μ ± r > 0: with η = atanh(r/μ) = ½ ln(λ₊/λ₋), P = |λ|^p cosh pη, Q = |λ|^p sinh(pη)/r,
    # which stays accurate as r → 0 (limit Q = p μ^{p−1}).
    eta = torch.atanh(root / mu)
    real_q = torch.where(root > 0, scale * torch.sinh(power * eta) / root, power * mu.pow(power - 1))
    complex_eigen = disc < 0
    p = torch.where(complex_eigen, complex_p, scale * torch.cosh(power * eta))
    q = torch.where(complex_eigen, complex_q, real_q)
    return p + q * (a - mu), q * b, q * c, p + q * (d - mu)


class RoAd(AdapterFamily):
    name = "RoAd"
    peft_types = ("ROAD",)
    composes_additively = False  # PEFT applies several of them one after another
    tokens = (THETA, ALPHA)
    schemes = {
        "linear": Scheme(
            "linear",
            "α → 1 + c(α − 1), θ → c·θ",
            "0: base · 1: trained · −1: mirrored angles and scales (not an inverse)",
            _linear,
        ),
        "power": Scheme(
            "power",
            "R → R^c per 2×2 block (road_1: α → α^c, θ → c·θ)",
            "0: base · 1: trained · −1: exact inverse R⁻¹ (road_2/4: fractional c refused where a block has a real eigenvalue ≤ 0)",
            _power,
        ),
        "strength": Scheme(
            "strength",
            "α → 1 + c(α − 1), θ kept",
            "0: the trained rotations without scaling (not the base) · 1: trained · −1: scales 2 − α",
            _strength,
            base_at_zero=False,
        ),
    }

    def parse(self, config, tensors, base_shapes, options):
        modules, _, _ = split_keys(tensors, self.tokens)
        variant_name = config.get("variant", "road_1")
        variant = VARIANTS.get(variant_name)
        if variant is None:
            raise UnsupportedAdapterError(f"RoAd variant {variant_name!r} is unknown; PEFT has road_1, road_2 and road_4.")
        group_size = int(config.get("group_size", 64))
        if group_size <= 0 or group_size % 2:
            raise AdapterError(f"RoAd group_size must be a positive even number, the adapter config says {group_size}.")
        states = []
        for path, params in modules.items():
            require(params, path, THETA, ALPHA)
            if params[THETA].shape != params[ALPHA].shape or params[THETA].dim() != 1:
                raise AdapterError(
                    f"RoAd module {path}: road_theta {tuple(params[THETA].shape)} and road_alpha "
                    f"{tuple(params[ALPHA].shape)} must be vectors of one length; the adapter file is inconsistent."
                )
            states.append(ModuleState(path, params, {"variant": variant, "group_size": group_size}))
        return states

    def check_shapes(self, state, weight_shape, bias_shape):
        if len(weight_shape) != 2:
            raise AdapterError(f"RoAd module {state.path}: the base weight has shape {weight_shape}, expected a 2-D matrix.")
        out_features, group_size = weight_shape[0], int(state.scalars["group_size"])
        if out_features % group_size:
            raise AdapterError(
                f"RoAd module {state.path}: {out_features} output features are not divisible by group_size {group_size}; "
                "is --base the model this adapter was trained on?"
            )
        expected = int(out_features * PARAMS_PER_OUTPUT[_variant(state)])
        if state.tensors[THETA].numel() != expected:
            raise shape_error(
                state.path, f"road_{_variant(state)} parameters per layer", expected, state.tensors[THETA].numel()
            )

    def weight(self, state, weight):
        return _rotate(state, weight)

    def changes_bias(self, state):
        return True

    def bias(self, state, bias):
        return _rotate(state, bias.unsqueeze(1)).squeeze(1)

    # ---- runtime ---------------------------------------------------------------------------------
    def live_state(self, layer, adapter, path):
        tensors = {THETA: layer.road_theta[adapter].detach().clone(), ALPHA: layer.road_alpha[adapter].detach().clone()}
        return ModuleState(path, tensors, {"variant": VARIANTS[layer.variant[adapter]], "group_size": layer.group_size[adapter]})

    def set_live_state(self, layer, adapter, state):
        layer.road_theta[adapter].data.copy_(state.tensors[THETA])
        layer.road_alpha[adapter].data.copy_(state.tensors[ALPHA])


# ---- the rotation -------------------------------------------------------------------------------


def _variant(state: ModuleState) -> int:
    return int(state.scalars["variant"])


def _half(state: ModuleState) -> int:
    return int(state.scalars["group_size"]) // 2


def _columns(state: ModuleState) -> tuple[torch.Tensor, torch.Tensor]:
    """f and s per output element, as peft/tuners/road/layer.py `_prepare_cols` computes them."""
    theta, alpha = state.tensors[THETA], state.tensors[ALPHA]
    variant, half = _variant(state), _half(state)
    if variant == 1:  # one (θ, α) per pair, shared by both halves of the group
        theta, alpha = (v.reshape(-1, half).repeat_interleave(2, dim=0).flatten() for v in (theta, alpha))
    if variant == 4:  # per group: g values for f, then g values for s
        theta, alpha = (v.reshape(-1, 2, 2 * half) for v in (theta, alpha))
        return (alpha[:, 0] * theta[:, 0].cos()).flatten(), (alpha[:, 1] * theta[:, 1].sin()).flatten()
    return alpha * theta.cos(), alpha * theta.sin()


def _rotate(state: ModuleState, rows: torch.Tensor) -> torch.Tensor:
    """R · rows, R applied as a 2×2 operation on each pair of rows (j, j + h) of every group."""
    f, s = _columns(state)
    half = _half(state)
    grouped = rows.reshape(-1, 2, half, rows.shape[1])
    first, second = grouped[:, 0], grouped[:, 1]
    f, s = (v.reshape(-1, 2, half, 1) for v in (f, s))
    rotated = torch.stack((f[:, 0] * first - s[:, 0] * second, f[:, 1] * second + s[:, 1] * first), dim=1)
    return rotated.reshape(rows.shape)


def _blocks(f: torch.Tensor, s: torch.Tensor, half: int) -> tuple[torch.Tensor, ...]:
    """Per pair (j, j + h) the block [[f_j, −s_j], [s_{j+h}, f_{j+h}]] as its four entries (a, b, c, d)."""
    f, s = f.reshape(-1, 2, half), s.reshape(-1, 2, half)
    return f[:, 0].flatten(), -s[:, 0].flatten(), s[:, 1].flatten(), f[:, 1].flatten()


def _from_blocks(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor, half: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `_blocks`: f and s per output element."""
    f = torch.stack((a.reshape(-1, half), d.reshape(-1, half)), dim=1).flatten()
    s = torch.stack((-b.reshape(-1, half), c.reshape(-1, half)), dim=1).flatten()
    return f, s

"""BOFT: butterfly-factorised orthogonal rotation of the layer input, times an output scale.

PEFT forward (peft/tuners/boft/layer.py, Linear.forward / get_delta_weight):
  S_{k,d} = ½(R − Rᵀ) of boft_R[k, d]      Q_{k,d} = (I − S)(I + S)⁻¹   (exact Cayley, always)
  B_k     = P_k · blockdiag(Q_{k,1..D}) · P_kᵀ,  P_k rebuilt from (in, D, b) by `block_butterfly_perm`
  M       = B_{N−1} ⋯ B_0                      y = s ⊙ (W Mᵀ x) + b   (the bias stays outside the scale)
Merged: W' = diag(s)·W·Mᵀ = diag(s)·W·B_0ᵀ⋯B_{N−1}ᵀ, each factor applied as a permuted per-block product;
bias unchanged. N is boft_R.shape[0]: PEFT without its CUDA extension builds N = 1 whatever the config says.
"""

from __future__ import annotations

import torch

from ..errors import AdapterError, SchemeError, UnsupportedAdapterError
from .base import AdapterFamily, ModuleState, Scheme, linear_from, require, shape_error, split_keys
from .orthogonal import cayley, rotate_blocks


def _linear(state: ModuleState, c: float) -> ModuleState:
    return state.with_tensors(boft_R=c * state.tensors["boft_R"], boft_s=linear_from(1.0, c, state.tensors["boft_s"]))


def _power(state: ModuleState, c: float) -> ModuleState:
    scale = state.tensors["boft_s"]
    if not float(c).is_integer() and (scale <= 0).any():
        raise SchemeError(
            f"BOFT module {state.path}: boft_s has entries ≤ 0, so s^{c:g} has no real value. "
            "Use an integer coeff or --scheme linear."
        )
    return state.with_tensors(boft_R=c * state.tensors["boft_R"], boft_s=scale**c)


class BOFT(AdapterFamily):
    name = "BOFT"
    peft_types = ("BOFT",)
    composes_additively = False  # PEFT applies several of them one after another
    tokens = ("boft_R", "boft_s")
    schemes = {
        "linear": Scheme(
            "linear",
            "boft_R → c·R, s → 1 + c(s − 1)",
            "0: base · 1: trained · −1: rotation inverted (butterfly N = 1), scale mirrored (not its inverse)",
            _linear,
        ),
        "power": Scheme(
            "power",
            "boft_R → c·R, s → s^c",
            "0: base · 1: trained · −1: exact inverse for butterfly N = 1 (N > 1: each factor inverted, "
            "kept in order); fractional c needs s > 0",
            _power,
        ),
    }

    def parse(self, config, tensors, base_shapes, options):
        modules, _, _ = split_keys(tensors, self.tokens)
        states = []
        for path, params in modules.items():
            require(params, path, "boft_R", "boft_s")
            rotation, scale = params["boft_R"], params["boft_s"]
            square = rotation.dim() == 4 and rotation.shape[-1] == rotation.shape[-2]
            if not square or scale.dim() != 2 or scale.shape[1] != 1:
                raise AdapterError(
                    f"BOFT module {path}: boft_R {tuple(rotation.shape)} and boft_s {tuple(scale.shape)} should be "
                    "(N, D, b, b) and (out, 1). The adapter file is damaged or not a BOFT adapter."
                )
            _check_butterfly(path, *rotation.shape[:3])
            states.append(ModuleState(path, {"boft_R": rotation, "boft_s": scale}))
        return states

    def check_shapes(self, state, weight_shape, bias_shape):
        if len(weight_shape) != 2:
            raise UnsupportedAdapterError(
                f"BOFT module {state.path}: BOFT on a {len(weight_shape)}-d (convolution) weight is not supported."
            )
        _, blocks, size, _ = state.tensors["boft_R"].shape
        expected = (state.tensors["boft_s"].shape[0], blocks * size)
        if tuple(weight_shape) != expected:
            raise shape_error(state.path, "weight shape", expected, tuple(weight_shape))

    def weight(self, state, weight):
        factors, blocks, size, _ = state.tensors["boft_R"].shape
        rotation = state.tensors["boft_R"].double()
        rotations = cayley(0.5 * (rotation - rotation.mT))[0].to(weight.dtype)
        result = weight
        for level in range(factors):  # W·B_kᵀ = ((W·P_k) · blockdiag(Q_k)ᵀ) · P_kᵀ, for k = 0 … N−1
            order = _butterfly_order(blocks * size, blocks // 2**level, size // 2, factors - 1).to(weight.device)
            permuted = rotate_blocks(result[:, torch.argsort(order)], rotations[level].mT)
            result = permuted[:, order]
        return state.tensors["boft_s"] * result

    # ---- runtime ---------------------------------------------------------------------------------
    def live_state(self, layer, adapter, path):
        tensors = {"boft_R": layer.boft_R[adapter].detach().clone(), "boft_s": layer.boft_s[adapter].detach().clone()}
        return ModuleState(path, tensors)

    def set_live_state(self, layer, adapter, state):
        layer.boft_R[adapter].data.copy_(state.tensors["boft_R"])
        layer.boft_s[adapter].data.copy_(state.tensors["boft_s"])


def _check_butterfly(path: str, factors: int, blocks: int, size: int) -> None:
    """The constraints PEFT's update_layer puts on N > 1, without which P_k is undefined."""
    if factors > 1 and (size % 2 or blocks % 2**(factors - 1)):
        raise AdapterError(
            f"BOFT module {path}: {factors} butterfly factors need an even block size and a block count divisible "
            f"by 2^{factors - 1}, but boft_R has {blocks} blocks of size {size}. The adapter file is damaged."
        )


def _butterfly_order(features: int, blocks: int, half: int, butterfly: int) -> torch.Tensor:
    """PEFT's `block_butterfly_perm(features, blocks, half, butterfly)`: P with P[i, order[i]] = 1.

    Within each chunk of features/blocks entries, pieces of `half` entries are reordered even pieces
    first, then odd ones; the identity when butterfly (= N − 1) is 0.
    """
    if butterfly == 0:
        return torch.arange(features)
    chunk = features // blocks
    pieces = chunk // half
    piece_order = [*range(0, pieces, 2), *range(1, pieces, 2)]
    within = torch.cat([torch.arange(p * half, (p + 1) * half) for p in piece_order])
    return torch.cat([start + within for start in range(0, features, chunk)])

"""PSOFT: an r × r transform R between the principal singular directions of W.

PEFT forward (peft/tuners/psoft/layer.py, Linear.forward / get_delta_weight; OrthLayer.get_matrix):
  W ≈ V_r S_r Uh_r (SVD of the fp32 weight: torch.linalg.svd, or svd_lowrank seeded by random_seed);
  A = Uh_r, B = V_r diag(S_r / s₀)  (ab_svd_init "psoft_init"; "pissa_init": √ split),  s₀ = psoft_alpha / r
  R = diag(vector_b) · Q(weight) · diag(vector_a),  Q = Cayley (I − K)⁻¹(I + K) of the skew K from `weight`
      (or its Neumann series; with psoft_orth=False `weight` is R itself)
  y = W x + b + s·B (R − I) A x,   s = layer.scaling (= s₀ as trained).
A and B are not saved: PEFT recomputes them from the base weight at load, and so does the merge. ΔW is
linear in s (no-op 0): the linear scheme is s → c·s, with A and B kept from s₀.
"""

from __future__ import annotations

import torch

from .base import ModuleState, require, shape_error, split_keys
from .scaled_delta import ScaledDeltaFamily

R_NAMES = ("psoft_R.weight", "psoft_R.vector_b", "psoft_R.vector_a")


class PSOFT(ScaledDeltaFamily):
    name = "PSOFT"
    peft_types = ("PSOFT",)
    tokens = ("psoft_R",)
    nested = True

    def knob_names(self):
        return (*R_NAMES, *self.knobs)

    def parse(self, config, tensors, base_shapes, options):
        modules, _, _ = split_keys(tensors, self.tokens, nested=self.nested)
        r = int(config.get("r", 32))
        scaling = config.get("psoft_alpha", 32) / r
        # How A, B and R are built: fixed settings the merge reads, carried with the scalars (no scheme moves them).
        settings = {key: config.get(key, default) for key, default in SETTINGS.items()}
        for path, params in modules.items():
            require(params, path, "psoft_R.weight")
        return [
            ModuleState(path, params, {"scaling": scaling, "svd_scaling": scaling, "r": r, **settings})
            for path, params in modules.items()
        ]

    def check_shapes(self, state, weight_shape, bias_shape):
        r = state.scalars["r"]
        expected = r * (r - 1) // 2 if state.scalars["psoft_orth"] else r * r
        if state.tensors["psoft_R.weight"].numel() != expected or r > min(weight_shape):
            raise shape_error(
                state.path, "rank r (psoft_R.weight size)", f"r = {r} ≤ min(out, in)", tuple(weight_shape)
            )

    def weight(self, state, weight):
        a, b = _svd_factors(state, weight)
        rotation = _rotation(state)
        identity = torch.eye(rotation.shape[0], dtype=rotation.dtype, device=rotation.device)
        return weight + state.scalars["scaling"] * (b @ (rotation - identity) @ a)


SETTINGS = {
    "ab_svd_init": "psoft_init",
    "psoft_svd": "full",
    "psoft_svd_lowrank_niter": None,
    "random_seed": 0,
    "psoft_orth": True,
    "use_cayley_neumann": False,
    "num_cayley_neumann_terms": 5,
    "cayley_neumann_eps": None,
}


def _svd_factors(state: ModuleState, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r × in) and B (out × r) as PsoftLayer._build_psoft_ab_cache_buffers computes them from W (on the CPU,
    where PEFT's load computes them for a CPU model)."""
    settings, r = state.scalars, state.scalars["r"]
    w = weight.detach().float().cpu()
    if settings["psoft_svd"] == "lowrank":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings["random_seed"])
            u, s, v = torch.svd_lowrank(w, q=r, niter=settings["psoft_svd_lowrank_niter"])
        left, values, right = u[:, :r], s[:r], v[:, :r].t()
    else:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        left, values, right = u[:, :r], s[:r], vh[:r, :]
    values = values / settings["svd_scaling"]
    if settings["ab_svd_init"] == "pissa_init":
        root = torch.sqrt(values)
        a, b = root[:, None] * right, left * root[None, :]
    else:
        a, b = right, left * values[None, :]
    return a.to(weight.device), b.to(weight.device)


def _rotation(state: ModuleState) -> torch.Tensor:
    """OrthLayer.get_matrix: R from the stored parameters."""
    t, settings, r = state.tensors, state.scalars, state.scalars["r"]
    raw = t["psoft_R.weight"]
    if not settings["psoft_orth"]:
        rotation = raw
    else:
        rows, cols = torch.triu_indices(r, r, 1, device=raw.device)
        upper = torch.zeros((r, r), dtype=raw.dtype, device=raw.device).index_put((rows, cols), raw)
        skew = upper - upper.T
        identity = torch.eye(r, dtype=raw.dtype, device=raw.device)
        if settings["use_cayley_neumann"]:
            rotation = _neumann(skew, identity, settings)
        else:
            rotation = torch.linalg.solve(identity - skew, identity + skew, left=False)
    if "psoft_R.vector_b" in t:
        rotation = t["psoft_R.vector_b"][:, None] * rotation
    if "psoft_R.vector_a" in t:
        rotation = rotation * t["psoft_R.vector_a"][None, :]
    return rotation


def _neumann(skew: torch.Tensor, identity: torch.Tensor, settings) -> torch.Tensor:
    """The truncated Cayley–Neumann series of OrthLayer.get_matrix: I + 2K + 2K² + … + K^(t−1)."""
    eps = settings["cayley_neumann_eps"]
    if eps is not None:
        norm = torch.linalg.norm(skew, ord="fro")
        if torch.isfinite(norm) and norm > eps:
            skew = skew * (eps / (norm + 1e-12))
    terms = int(settings["num_cayley_neumann_terms"])
    rotation = identity.clone()
    if terms > 1:
        rotation = rotation + 2.0 * skew
        if terms > 2:
            power = skew @ skew
            rotation = rotation + 2.0 * power
            for _ in range(3, terms - 1):
                power = power @ skew
                rotation = rotation + 2.0 * power
            rotation = rotation + power @ skew
    return rotation

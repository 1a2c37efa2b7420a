"""WaveFT: a sparse set of wavelet coefficients whose inverse 2-D wavelet transform is the weight change.

PEFT forward (peft/tuners/waveft/layer.py, WaveFTLayer.get_delta_weight; waverec2d.py):
  idx = randperm(out·in, generator seeded with random_loc_seed)[:n]  → positions (idx // in, idx % in)
  use_idwt: the spectrum is placed in a zero (out + red_r) × (in + red_c) grid (each side rounded up to even,
            positions shifted by half the padding), split into quadrants cA | cH / cV | cD, and one level of
            the inverse DWT is taken: conv_transpose2d(stack(cA, cH, cV, cD), [lo⊗lo, hi⊗lo, lo⊗hi, hi⊗hi],
            stride 2), cropped by (2L − 3)//2 per side, then centre-cropped to out × in;
  otherwise the grid itself (out × in) is ΔW.  y = W x + b + scaling·ΔW x (Conv1D: same Linear orientation).
The wavelet filters (rec_lo, rec_hi) and the padding table come from PEFT's own wavelet module.
"""

from __future__ import annotations

import torch

from ..errors import AdapterError
from .base import ModuleState, require, shape_error, split_keys
from .fourierft import seeded_positions
from .scaled_delta import ScaledDeltaFamily

SPECTRUM = "waveft_spectrum"


class WaveFT(ScaledDeltaFamily):
    name = "WaveFT"
    peft_types = ("WAVEFT",)
    tokens = (SPECTRUM,)
    scale_attribute = "waveft_scaling"

    def parse(self, config, tensors, base_shapes, options):
        modules, _, _ = split_keys(tensors, self.tokens)
        scalars = {
            "scaling": float(config.get("scaling", 25.0)),
            "random_loc_seed": int(config.get("random_loc_seed", 777)),
            "use_idwt": bool(config.get("use_idwt", True)),
            "wavelet_family": config.get("wavelet_family", "db1"),
        }
        fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
        for path, params in modules.items():
            require(params, path, SPECTRUM)
        if scalars["use_idwt"]:
            _filters(scalars["wavelet_family"])  # refuse an unknown family before any output exists
        return [
            ModuleState(path, params, dict(scalars), fan_in_fan_out=fan_in_fan_out) for path, params in modules.items()
        ]

    def check_shapes(self, state, weight_shape, bias_shape):
        n, (out_features, in_features) = state.tensors[SPECTRUM].numel(), weight_shape
        if n > out_features * in_features:
            raise shape_error(state.path, "weight size", f"at least {n} entries", f"{out_features}×{in_features}")

    def weight(self, state, weight):
        return weight + state.scalars["scaling"] * _delta(state, *weight.shape).to(weight.device)

    def live_scalars(self, layer, adapter):
        return {
            **super().live_scalars(layer, adapter),
            "random_loc_seed": layer.waveft_random_loc_seed[adapter],
            "use_idwt": layer.waveft_use_idwt[adapter],
            "wavelet_family": layer.waveft_wavelet_family[adapter],
        }


def _delta(state: ModuleState, out_features: int, in_features: int) -> torch.Tensor:
    spectrum = state.tensors[SPECTRUM].cpu()
    rows, cols = seeded_positions(out_features, in_features, spectrum.numel(), state.scalars["random_loc_seed"])
    if not state.scalars["use_idwt"]:
        return torch.zeros(out_features, in_features).index_put((rows, cols), spectrum)
    (lo, hi), (extra_rows, extra_cols) = _filters(state.scalars["wavelet_family"])
    height, width = _even(out_features + extra_rows), _even(in_features + extra_cols)
    grid = torch.zeros(height, width)
    grid[rows + (height - out_features) // 2, cols + (width - in_features) // 2] = spectrum
    half_h, half_w = height // 2, width // 2
    quadrants = torch.stack(
        [grid[:half_h, :half_w], grid[:half_h, half_w:], grid[half_h:, :half_w], grid[half_h:, half_w:]]
    )
    kernel = torch.stack(
        [torch.outer(lo, lo), torch.outer(hi, lo), torch.outer(lo, hi), torch.outer(hi, hi)]
    ).unsqueeze(1)
    image = torch.nn.functional.conv_transpose2d(quadrants.unsqueeze(0), kernel, stride=2)[0, 0]
    pad = (2 * lo.numel() - 3) // 2
    if pad > 0:
        image = image[pad:-pad, pad:-pad]
    top, left = (image.shape[0] - out_features) // 2, (image.shape[1] - in_features) // 2
    return image[top : top + out_features, left : left + in_features]


def _even(size: int) -> int:
    return size + size % 2


def _filters(family: str) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[int, int]]:
    """(rec_lo, rec_hi) and the padding PEFT adds for this wavelet family."""
    try:
        from peft.tuners.waveft.constants import WAVELET_REDUCTIONS
        from peft.tuners.waveft.wavelet import Wavelet
    except ImportError as e:
        raise AdapterError(f"Merging a WaveFT adapter reads PEFT's wavelet filter table; install peft ({e}).") from e
    if family not in WAVELET_REDUCTIONS:
        raise AdapterError(f"WaveFT wavelet_family {family!r} is not one PEFT knows ({', '.join(WAVELET_REDUCTIONS)}).")
    wavelet = Wavelet(family)
    return (torch.tensor(wavelet.rec_lo), torch.tensor(wavelet.rec_hi)), WAVELET_REDUCTIONS[family]

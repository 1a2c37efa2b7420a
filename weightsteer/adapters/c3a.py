"""C3A: a block-circulant update, one trained kernel per (output block, input block) pair.

PEFT forward (peft/tuners/c3a/layer.py, C3ALinear.forward; utils.BlockCircularConvolution):
  y = W x + b + (1/in)·C x,  computed as fft(ifft(x_blocks)·fft(K)) in fp32,
where C is block-circulant: block (m, n) of size b×b has C_mn[i, j] = K[m, n, (j − i) mod b]
(the matrix form of that FFT product; peft's own merge builds it with utils.get_circulant_fast).
`in` is the layer's full input size, not b. So W' = W + C/in; no bias change.
"""

from __future__ import annotations

import torch

from .base import AdapterFamily, ModuleState, Scheme, require, shape_error, split_keys

KERNEL = "c3a_kernel"


def _scale(state: ModuleState, c: float) -> ModuleState:
    return state.with_tensors(c3a_kernel=c * state.tensors[KERNEL])


class C3A(AdapterFamily):
    name = "C3A"
    peft_types = ("C3A",)
    tokens = (KERNEL,)
    schemes = {
        "linear": Scheme(
            "linear",
            "kernel → c·kernel",
            "0: base · 1: trained · −1: W − ΔW",
            _scale,
        ),
    }

    def parse(self, config, tensors, base_shapes, options):
        modules, _, _ = split_keys(tensors, self.tokens)
        for path, params in modules.items():
            require(params, path, KERNEL)
        return [ModuleState(path, params) for path, params in modules.items()]

    def check_shapes(self, state, weight_shape, bias_shape):
        out_blocks, in_blocks, block = state.tensors[KERNEL].shape
        expected = (out_blocks * block, in_blocks * block)
        if tuple(weight_shape) != expected:
            what = "weight shape (c3a_kernel blocks × block_size)"
            raise shape_error(state.path, what, expected, tuple(weight_shape))

    def weight(self, state, weight):
        return weight + _block_circulant(state.tensors[KERNEL]) / weight.shape[1]

    # ---- runtime ---------------------------------------------------------------------------------
    def live_state(self, layer, adapter, path):
        return ModuleState(path, {KERNEL: layer.c3a_kernel[adapter].detach().clone()})

    def set_live_state(self, layer, adapter, state):
        layer.c3a_kernel[adapter].data.copy_(state.tensors[KERNEL])


def _block_circulant(kernel: torch.Tensor) -> torch.Tensor:
    """C (out × in) with block (m, n) = [K[m, n, (j − i) mod b]]_{i,j}."""
    out_blocks, in_blocks, block = kernel.shape
    offsets = torch.arange(block, device=kernel.device)
    shift = (offsets[None, :] - offsets[:, None]) % block  # shift[i, j] = (j − i) mod b
    blocks = kernel[:, :, shift]  # (out_blocks, in_blocks, b, b)
    return blocks.permute(0, 2, 1, 3).reshape(out_blocks * block, in_blocks * block)

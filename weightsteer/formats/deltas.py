"""Closed forms shared by the weight-change formats: a dense ΔW and a low-rank B·A, both W + c·s·ΔW."""

from __future__ import annotations

import torch

from ..adapters.base import AdapterFamily, Scheme, scale_scaling, shape_error

LINEAR = Scheme("linear", "W → W + c·s·ΔW", "0: base · 1: the format's own strength · −1: W − s·ΔW", scale_scaling)


class DenseDelta(AdapterFamily):
    """tensors "delta" (the base tensor's stored orientation) and/or "delta.bias"; W + scaling·ΔW."""

    name = "dense delta"
    peft_types = ()
    tokens = ("delta",)
    knobs = ("scaling",)
    schemes = {"linear": LINEAR}

    def parse(self, config, tensors, base_shapes, options):
        raise NotImplementedError  # the format reads its own keys into states

    def weight(self, state, weight):
        delta = state.tensors["delta"]
        return weight + state.scalars["scaling"] * (delta.T if state.fan_in_fan_out else delta)

    def bias(self, state, bias):
        return bias + state.scalars["scaling"] * state.tensors["delta.bias"]

    def changes_weight(self, state):
        return "delta" in state.tensors

    def changes_bias(self, state):
        return "delta.bias" in state.tensors

    def check_shapes(self, state, weight_shape, bias_shape):
        if "delta" in state.tensors:
            shape = tuple(state.tensors["delta"].shape)
            expected = tuple(weight_shape[::-1]) if state.fan_in_fan_out else tuple(weight_shape)
            if shape != expected:
                raise shape_error(state.path, "ΔW shape vs the base weight", shape, expected)
        if "delta.bias" in state.tensors and bias_shape != tuple(state.tensors["delta.bias"].shape):
            raise shape_error(state.path, "Δbias shape vs the base bias", tuple(state.tensors["delta.bias"].shape), bias_shape)

    def tied_head_follows(self, config):
        return True  # a tied parameter is one tensor: changing the embedding changes the head


class LowRankDelta(AdapterFamily):
    """tensors "B" (out × k), "A" (k × in); W + scaling·B·A."""

    name = "low-rank delta"
    peft_types = ()
    tokens = ("A", "B")
    knobs = ("scaling",)
    schemes = {"linear": LINEAR}

    def parse(self, config, tensors, base_shapes, options):
        raise NotImplementedError

    def weight(self, state, weight):
        return torch.addmm(weight, state.tensors["B"], state.tensors["A"], alpha=state.scalars["scaling"])

    def low_rank(self, state, shape):
        return state.scalars["scaling"] * state.tensors["B"], state.tensors["A"]

    def check_shapes(self, state, weight_shape, bias_shape):
        found = (state.tensors["B"].shape[0], state.tensors["A"].shape[1])
        if tuple(weight_shape) != found:
            raise shape_error(state.path, "B·A shape vs the base weight", found, tuple(weight_shape))

"""TrainableTokens: retrained rows of an embedding matrix (also LoRA's `trainable_token_indices`).

PEFT forward (peft/tuners/trainable_tokens/layer.py, get_merged_weights): the layer looks tokens up
in `W.index_copy(0, token_indices, trainable_tokens_delta)`. Despite its name the stored tensor
holds the NEW ROWS (k × d), not a difference; the indices come from the config and the original
rows from the base. At strength c each row moves from the base row toward the trained one:
  E'[idx] = E[idx] + c·(new − E[idx])        (held as the scalar `mix`, = c under the linear scheme)
With tied embeddings PEFT ties the head's token adapter to the embedding's (TrainableTokensModel.
inject_adapter), so the head sees the same rows: one write into the shared tensor is exact.
"""

from __future__ import annotations

import torch

from ..errors import AdapterError
from .base import AdapterFamily, ModuleState, Scheme, require, scale_mix, shape_error, split_keys, toward


ROWS = "trainable_tokens_delta"  # PEFT's name; the tensor holds the new rows themselves
INDICES = "token_indices"
HEAD_PATH = "lm_head"


class TrainableTokens(AdapterFamily):
    name = "TrainableTokens"
    peft_types = ("TRAINABLE_TOKENS",)
    tokens = (ROWS,)
    schemes = {
        "linear": Scheme(
            "linear",
            "E[idx] → E[idx] + c·(new − E[idx])",
            "0: base · 1: trained · −1: E[idx] − (new − E[idx])",
            scale_mix,
        ),
    }

    def parse(self, config, tensors, base_shapes, options):
        indices = config_token_indices(config.get("token_indices"), "token_indices")
        modules, _, _ = split_keys(tensors, self.tokens)
        states = []
        for path, params in modules.items():
            require(params, path, ROWS)
            states.append(token_state(path, params[ROWS], indices))
        return _without_tied_head_copy(states, base_shapes.shapes)

    def tied_head_follows(self, config: dict) -> bool:
        return True  # the head's token adapter is tied to the embedding's: it reads the same rows

    def check_shapes(self, state, weight_shape, bias_shape):
        check_token_shapes(state, weight_shape)

    def weight(self, state, weight):
        return merged_rows(state, weight)

    # ---- runtime ---------------------------------------------------------------------------------
    def live_state(self, layer, adapter, path):
        return live_token_state(layer, adapter, path)

    def set_live_state(self, layer, adapter, state):
        set_live_token_state(layer, adapter, state)


# ---- shared with LoRA's trainable_token_indices ---------------------------------------------------


def token_state(path: str, rows: torch.Tensor, indices: list[int]) -> ModuleState:
    """A module whose rows `indices` are replaced by `rows`, at full strength (mix = 1)."""
    if rows.ndim != 2 or rows.shape[0] != len(indices):
        raise AdapterError(
            f"Trainable tokens of {path}: the adapter stores {tuple(rows.shape)} rows for {len(indices)} token "
            "indices in its config; the adapter file and adapter_config.json do not belong together."
        )
    return ModuleState(path, {ROWS: rows, INDICES: torch.tensor(indices, dtype=torch.long)}, {"mix": 1.0}, layer="embedding")


def check_token_shapes(state: ModuleState, weight_shape: tuple[int, ...]) -> None:
    rows, indices = state.tensors[ROWS], state.tensors[INDICES]
    if len(weight_shape) != 2 or weight_shape[1] != rows.shape[1]:
        raise shape_error(state.path, "embedding width", rows.shape[1], tuple(weight_shape))
    if int(indices.min()) < 0 or int(indices.max()) >= weight_shape[0]:
        raise AdapterError(
            f"Trainable tokens of {state.path}: token indices {int(indices.min())}…{int(indices.max())} do not fit "
            f"the base vocabulary of {weight_shape[0]} rows. Merge into the (resized) model the adapter was trained on."
        )


def merged_rows(state: ModuleState, weight: torch.Tensor) -> torch.Tensor:
    """W with rows idx set to W[idx] + mix·(new − W[idx])  (TrainableTokensLayer.get_merged_weights at mix 1)."""
    indices = state.tensors[INDICES]
    return weight.index_copy(0, indices, _rows_at_mix(state, weight[indices]))


def live_token_state(layer: torch.nn.Module, adapter: str, path: str) -> ModuleState:
    """The state of a live TrainableTokensLayer (also the `token_adapter` inside LoRA's wrapper)."""
    return token_state(path, layer.trainable_tokens_delta[adapter].detach().clone(), list(layer.token_indices[adapter]))


def set_live_token_state(layer: torch.nn.Module, adapter: str, state: ModuleState) -> None:
    """Write the state's rows into the live trainable_tokens_delta, base rows read from the live base layer."""
    base_rows = layer.get_base_layer().weight.detach()[state.tensors[INDICES]].float()
    layer.trainable_tokens_delta[adapter].data.copy_(_rows_at_mix(state, base_rows))


def _rows_at_mix(state: ModuleState, base_rows: torch.Tensor) -> torch.Tensor:
    return toward(base_rows, state.tensors[ROWS], state.scalars["mix"])


def config_token_indices(indices: object, option: str) -> list[int]:
    if not isinstance(indices, list) or not indices or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
        raise AdapterError(f"adapter_config.json: {option} must be a non-empty list of token ids, got {indices!r}.")
    return indices


def _without_tied_head_copy(states: list[ModuleState], base_shapes) -> list[ModuleState]:
    """Drop the head's copy of the rows when the checkpoint ties the head to the embedding.

    PEFT's tied head adapter shares the embedding's parameter dict, so save_pretrained writes the same
    rows twice (`lm_head.trainable_tokens_delta`); the shared base tensor must receive them once.
    """
    if HEAD_PATH + ".weight" in base_shapes:
        return states
    head = next((s for s in states if s.path == HEAD_PATH), None)
    others = [s for s in states if s is not head]
    if head is not None and any(_same_rows(head, s) for s in others):
        return others
    return states


def _same_rows(a: ModuleState, b: ModuleState) -> bool:
    return all(torch.equal(a.tensors[n], b.tensors[n]) for n in (ROWS, INDICES))

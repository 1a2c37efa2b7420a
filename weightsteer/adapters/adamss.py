"""AdaMSS: low-rank updates in subspaces found by clustering the rows of the base weight's singular vectors.

PEFT forward (peft/tuners/adamss/layer.py, AdamssLayer.update_layer / Linear.forward / get_delta_weight):
  W̃ = [W | b] (the bias as an extra column where the layer has one), newB = V_Rᵀ (R × in[+1], saved),
  y = W x + b + scatter(concat_i B_i A_i newB x̃),   x̃ = [x | 1],  A_i: r_i × R,  B_i: rows(i) × r_i,
  so ΔW̃[rows(i)] = B_i A_i newB: W gets the first in columns, the bias the last.
rows(i) is not saved: PEFT recomputes it from the base at load, and so does the merge (parse reads the base
weight): U of svd_lowrank(W̃, q = min(R, out, in[+1]), niter=2) seeded by random_seed (utils.slice_pca),
its rows clustered by scikit-learn's KMeans(init="random", n_init=1, max_iter=10, random_state=123456789)
into min(K, out) subspaces (utils.clustering_Z), rows(i) = the rows labelled i in order (utils.seg_locations),
computed on the CPU as PEFT does for a CPU model. ΔW̃ is linear in B (no-op 0): the linear scheme is B → c·B.
"""

from __future__ import annotations

import torch

from ..errors import AdapterError, UnsupportedAdapterError
from .base import ModuleState, Scheme, require, scale_tensors, shape_error, split_keys
from .scaled_delta import TensorDictFamily

A, B, NEW_B = "adamss_A", "adamss_B", "adamss_newB"
ROWS = "scatter_index"  # the rows of every subspace, concatenated in subspace order (PEFT's scatter_index)
KMEANS = {"init": "random", "n_init": 1, "max_iter": 10, "random_state": 123456789}  # clustering_Z(UU, K, 10)


class AdaMSS(TensorDictFamily):
    name = "AdaMSS"
    peft_types = ("ADAMSS",)
    tokens = (A, B, NEW_B)
    nested = True
    schemes = {"linear": Scheme("linear", "B → c·B", "0: base · 1: trained · −1: W − ΔW", scale_tensors(B))}

    def knob_names(self):
        return ()  # the change is linear in each factor: knob:<factor> would be the linear scheme again

    def parse(self, config, tensors, base_shapes, options):
        modules, _, _ = split_keys(tensors, self.tokens, nested=self.nested)
        states = []
        for path, params in modules.items():
            require(params, path, NEW_B, f"{A}.0", f"{B}.0")
            weight = base_shapes.tensor(path + ".weight")
            if weight is None:
                raise AdapterError(
                    f"AdaMSS module {path}: the base checkpoint has no tensor {path}.weight, from which PEFT derives the "
                    "module's subspaces. Is --base the model this adapter was trained on?"
                )
            bias = base_shapes.tensor(path + ".bias")
            _check_layout(path, params, tuple(weight.shape), bias is not None)
            matrix = weight if bias is None else torch.cat((weight, bias[:, None]), dim=1)
            rows = _subspace_rows(matrix, config)
            _check_subspaces(path, params, rows)
            states.append(ModuleState(path, {**params, ROWS: torch.cat(rows)}, {"bias": bias is not None}))
        return states

    def weight(self, state, weight):
        left, right = _factors(state)
        return weight + left @ right[:, : weight.shape[1]]

    def changes_bias(self, state):
        return state.scalars["bias"]

    def bias(self, state, bias):
        left, right = _factors(state)
        return bias + left @ right[:, -1]

    def low_rank(self, state, shape):
        left, right = _factors(state)
        return left, right[:, : shape[1]]

    # ---- runtime ---------------------------------------------------------------------------------
    def live_scalars(self, layer, adapter):
        return {"bias": layer.get_base_layer().bias is not None}

    def live_state(self, layer, adapter, path):
        state = super().live_state(layer, adapter, path)
        state.tensors[ROWS] = layer.scatter_index[adapter].clone()
        return state


def _subspaces(state: ModuleState) -> int:
    return sum(1 for name in state.tensors if name.startswith(A + "."))


def _factors(state: ModuleState) -> tuple[torch.Tensor, torch.Tensor]:
    """ΔW̃ = L R: L (out × Σr_i) holds each B_i at its subspace's rows (the scatter), R = [A_0; A_1; …] newB."""
    t = state.tensors
    count = _subspaces(state)
    blocks = torch.block_diag(*(t[f"{B}.{i}"] for i in range(count)))
    left = blocks.new_zeros(t[ROWS].numel(), blocks.shape[1]).index_copy_(0, t[ROWS], blocks)
    right = torch.cat([t[f"{A}.{i}"] for i in range(count)]) @ t[NEW_B]
    return left, right


def _subspace_rows(matrix: torch.Tensor, config: dict) -> list[torch.Tensor]:
    """The rows of each subspace, as AdamssLayer.update_layer finds them (slice_pca, clustering_Z, seg_locations)."""
    kmeans_class = _kmeans()
    rank = min(int(config.get("r", 100)), *matrix.shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(config.get("random_seed", 0)))
        left, _, _ = torch.svd_lowrank(matrix.cpu(), q=rank, niter=2, M=None)
    count = min(int(config.get("num_subspaces", 5)), matrix.shape[0])
    points = left[:, :rank].contiguous().numpy().astype("float32")
    labels = torch.from_numpy(kmeans_class(n_clusters=count, **KMEANS).fit_predict(points)).long()
    return [torch.where(labels == i)[0] for i in range(count)]


def _kmeans():
    try:
        from sklearn.cluster import KMeans
    except ImportError:
        raise UnsupportedAdapterError(
            "Merging an AdaMSS adapter needs scikit-learn: PEFT recomputes its subspaces with scikit-learn's k-means "
            "over the base weight, and the merge must do the same. Install it: `pip install scikit-learn` "
            "(or `pip install weightsteer[adamss]`)."
        ) from None
    return KMeans


def _check_layout(path: str, params: dict[str, torch.Tensor], weight_shape: tuple[int, ...], has_bias: bool) -> None:
    if len(weight_shape) != 2:
        raise UnsupportedAdapterError(f"AdaMSS module {path} adapts a base weight of shape {weight_shape}; PEFT's AdaMSS wraps Linear layers only.")
    columns = weight_shape[1] + has_bias
    if params[NEW_B].shape[1] != columns:
        what = "input features + 1 for the bias (adamss_newB columns)" if has_bias else "input features (adamss_newB columns)"
        raise shape_error(path, what, params[NEW_B].shape[1], columns)
    rows = sum(t.shape[0] for name, t in params.items() if name.startswith(B + "."))
    if rows != weight_shape[0]:
        raise shape_error(path, "output features (rows of all adamss_B)", rows, weight_shape[0])


def _check_subspaces(path: str, params: dict[str, torch.Tensor], rows: list[torch.Tensor]) -> None:
    """The saved B_i have as many rows as the subspace they were trained for: a different clustering here means
    PEFT too would now apply them to other rows than they were trained on."""
    count = sum(1 for name in params if name.startswith(B + "."))
    require(params, path, *(f"{name}.{i}" for name in (A, B) for i in range(count)))
    saved = [params[f"{B}.{i}"].shape[0] for i in range(count)]
    found = [len(r) for r in rows]
    if saved != found:
        raise AdapterError(
            f"AdaMSS module {path}: clustering the base weight gives subspaces of {found} rows, but the adapter's "
            f"adamss_B have {saved} rows. PEFT re-clusters the base at load (seeded SVD + k-means); this base, device "
            "or torch/scikit-learn version clusters it differently than at training, so even PEFT would apply the "
            "subspaces to the wrong rows. Merge into the exact base the adapter was trained on."
        )

"""What an architecture calls its input embedding and output head, and which weights it ties, read from
transformers itself: the model class named by config.json `architectures`, built on the meta device (no
memory, no weights), asked `get_input_embeddings()` / `get_output_embeddings()` and for its expanded
tied-weights mapping (`PreTrainedModel.get_expanded_tied_weights_keys`, which reads the config's
`tie_word_embeddings` where this transformers version reads it, VLM sub-configs included).

Names are in the model's name space (what PEFT's saved keys use); planner._resolve maps them to the
checkpoint's. When transformers does not know the architecture (remote code) the answer is None and the
planner falls back to the checkpoint's own names.
"""

from __future__ import annotations

import functools
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Anatomy:
    """Parameter names (model name space) of the embedding and head, and the tied weights {target: source}."""

    model_class: str
    input_embedding: str | None
    output_embedding: str | None
    tied: dict[str, str] = field(default_factory=dict)
    on_disk: dict[str, str] = field(default_factory=dict)  # model name → checkpoint name, where they differ
    reads_tie_flag: bool = True  # does the config class honour tie_word_embeddings: false? (T5's forces true)

    def group(self, name: str) -> list[str]:
        """Every parameter that shares storage with `name` (itself included), source first; [] if untied."""
        source = self.tied.get(name, name)
        targets = [t for t, s in self.tied.items() if s == source]
        return [source, *targets] if targets else []


def model_class(config: dict):
    """The transformers class config.json's `architectures` names, or None (remote code, unknown name)."""
    import transformers

    for name in config.get("architectures") or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and hasattr(cls, "from_pretrained"):
            return cls
    return None


@functools.lru_cache(maxsize=8)
def _anatomy(config_text: str, root: str, stored: tuple[str, ...]) -> Anatomy | None:
    import torch

    config = json.loads(config_text)
    cls = model_class(config)
    if cls is None:
        return None
    from transformers import AutoConfig
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # config validation warnings about a checkpoint are not ours to print
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = AutoConfig.from_pretrained(root)
            with torch.device("meta"):
                model = cls(loaded)
    except Exception:  # an architecture transformers cannot build from this config: use the checkpoint's names
        return None
    finally:
        logging.set_verbosity(verbosity)
    names = {id(module): name for name, module in model.named_modules()}

    def weight_of(module) -> str | None:
        name = names.get(id(module)) if module is not None else None
        return None if name is None or not hasattr(module, "weight") else f"{name}.weight"

    try:
        embedding = weight_of(model.get_input_embeddings())
    except NotImplementedError:
        embedding = None
    tied = model.get_expanded_tied_weights_keys(all_submodels=True)
    untied = type(loaded).from_dict({**loaded.to_dict(), "tie_word_embeddings": False})
    head = weight_of(model.get_output_embeddings())
    return Anatomy(cls.__name__, embedding, head, tied, _renamed(model, stored), untied.tie_word_embeddings is False)


def _renamed(model, stored: tuple[str, ...]) -> dict[str, str]:
    """{model name: checkpoint name} for checkpoint tensors transformers renames on load (GPT-NeoX `embed_out` →
    `lm_head`): the model's own renaming rules (transformers.conversion_mapping), applied as from_pretrained does."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    if not renamings:
        return {}
    state = model.state_dict()
    renamed = {rename_source_key(name, renamings, [], model.base_model_prefix, state)[0]: name for name in stored}
    return {new: old for new, old in renamed.items() if new != old}


def anatomy(root: Path, config: dict, stored: tuple[str, ...]) -> Anatomy | None:
    """The Anatomy of the checkpoint at root with tensors `stored` (cached), or None when transformers cannot build it."""
    return _anatomy(json.dumps(config, sort_keys=True), str(root), stored)

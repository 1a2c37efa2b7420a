"""What an architecture calls its input embedding and output head, and which weights it ties, read from
transformers itself on the meta-device model weightsteer.names builds from config.json `architectures`:
`get_input_embeddings()` / `get_output_embeddings()` and the expanded tied-weights mapping
(`PreTrainedModel.get_expanded_tied_weights_keys`, which reads `tie_word_embeddings` where this transformers
version reads it, VLM sub-configs included).

Names are in the model's name space (what PEFT's saved keys use); weightsteer.names maps them to the
checkpoint's. When transformers cannot build the model (remote code) there is no Anatomy.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Anatomy:
    """Parameter names (model name space) of the embedding and head, and the tied weights {target: source}."""

    model_class: str
    input_embedding: str | None
    output_embedding: str | None
    tied: dict[str, str] = field(default_factory=dict)
    reads_tie_flag: bool = True  # does the config class honour tie_word_embeddings: false? (T5's forces true)

    def group(self, name: str) -> list[str]:
        """Every parameter that shares storage with `name` (itself included), source first; [] if untied."""
        source = self.tied.get(name, name)
        targets = [t for t, s in self.tied.items() if s == source]
        return [source, *targets] if targets else []


def anatomy_of(model) -> Anatomy:
    """The Anatomy of a (meta-device) transformers model."""
    names = {id(module): name for name, module in model.named_modules()}

    def weight_of(module) -> str | None:
        name = names.get(id(module)) if module is not None else None
        return None if name is None or not hasattr(module, "weight") else f"{name}.weight"

    try:
        embedding = weight_of(model.get_input_embeddings())
    except NotImplementedError:
        embedding = None
    config = model.config
    untied = type(config).from_dict({**config.to_dict(), "tie_word_embeddings": False})
    tied = model.get_expanded_tied_weights_keys(all_submodels=True)
    return Anatomy(type(model).__name__, embedding, weight_of(model.get_output_embeddings()), tied, untied.tie_word_embeddings is False)


def model_class(config: dict):
    """The transformers class config.json's `architectures` names, or None (remote code, unknown name)."""
    import transformers

    for name in config.get("architectures") or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and hasattr(cls, "from_pretrained"):
            return cls
    return None

"""The model card (README.md) of a merged checkpoint, with Hub metadata."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData


def write_card(folder: Path, provenance: dict, title: str) -> None:
    base = provenance["base_model"]
    data = ModelCardData(
        base_model=base if not Path(base).exists() else None,
        base_model_relation="finetune",
        library_name="transformers",
        tags=["weightsteer", "steering", provenance["adapter_type"].lower()],
    )
    scheme = provenance["scheme"]
    rounding = provenance["result"]["rounding"]
    body = f"""
# {title}

This checkpoint is `{base}` with the {provenance["adapter_type"]} steering adapter `{provenance["adapter"]}` baked into
its weights by [weightsteer](https://pypi.org/project/weightsteer/) {provenance["weightsteer_version"]}. It runs at no
extra cost anywhere the base runs: no PEFT needed.

| | |
|---|---|
| coeff | {provenance["coeff"]} |
| scheme | `{scheme["name"]}`: {scheme["formula"]} |
| tensors changed | {len(provenance["result"]["changed_tensors"])} |
| rounding | {rounding["swallowed_share"]:.1%} of changed elements rounded back to the base value; relative error of the change {rounding["relative_error"]:.2%} |

## Load it

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("<this folder or repo>")
```
"""
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
    card.save(folder / "README.md")

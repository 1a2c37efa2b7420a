"""Recipes: many outputs, each a list of adapters at their own coeffs, built from one read of the base.

    base: ./base                # optional: default the adapters' common base (refused if they differ)
    dtype: bfloat16             # optional
    compose: chain              # optional: chain (default) or sum; an output may set its own
    outputs:
      - path: ./honest-formal
        adapters:
          - {adapter: ./honest, coeff: 0.5}
          - {adapter: ./formal, coeff: -0.3, scheme: linear}
      - path: ./honest-full
        adapters:
          - {adapter: ./honest, coeff: 1.0}
        push: user/honest-full    # optional, per output; verified first, as for merge --push

YAML, or JSON with the same keys. Relative paths are relative to the recipe file (a dict: to the current
folder); an adapter or base that is no folder there is read as a Hub repo id. Every key, path and coeff is
checked here, before any work; unknown keys are errors that name the key and the file.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from .errors import RecipeError
from .merge import MergeResult, Steer, Target
from .planner import COMPOSE_MODES

RECIPE_KEYS = {"base", "dtype", "compose", "outputs"}
OUTPUT_KEYS = {"path", "adapters", "push", "compose"}
TERM_KEYS = {"adapter", "coeff", "scheme"}
DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class Recipe:
    """A parsed recipe: the targets to write, the Hub repo each one is pushed to (or None), and the run's options."""

    source: str  # the file, or "<dict>"
    targets: list[Target]
    pushes: list[str | None]
    base: str | None = None
    dtype: str | None = None


def load_recipe(recipe: str | os.PathLike | Mapping) -> Recipe:
    """Read and check a recipe file (YAML or JSON) or dict."""
    if isinstance(recipe, Mapping):
        return parse_recipe(recipe, "<dict>", Path.cwd())
    path = Path(recipe)
    if not path.is_file():
        raise RecipeError(f"Recipe {path} does not exist; pass a YAML or JSON file.")
    return parse_recipe(_read(path), str(path), path.parent)


def _read(path: Path) -> object:
    import yaml  # PyYAML reads JSON too, but JSON's own errors are clearer for .json files

    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"Recipe {path} cannot be read: {e}.") from None
    try:
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        raise RecipeError(f"Recipe {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}") from None


def parse_recipe(data: object, source: str, root: Path) -> Recipe:
    top = _mapping(data, RECIPE_KEYS, source, "the recipe")
    outputs = top.get("outputs")
    if not isinstance(outputs, list) or not outputs:
        raise RecipeError(f"{source}: 'outputs' must be a non-empty list of outputs (path, adapters).")
    default_compose = _compose(top.get("compose", "chain"), source, "the recipe")
    dtype = top.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise RecipeError(f"{source}: dtype must be one of {', '.join(DTYPES)}; got {dtype!r}.")
    base = _string(top["base"], source, "base") if "base" in top else None
    recipe = Recipe(source, [], [], _reference(base, root, source, "base") if base else None, dtype)
    for number, entry in enumerate(outputs, 1):
        where = f"output {number}"
        output = _mapping(entry, OUTPUT_KEYS, source, where)
        if "path" not in output:
            raise RecipeError(f"{source}: {where} has no 'path'.")
        path = root / Path(_string(output["path"], source, f"{where} path")).expanduser()
        terms = output.get("adapters")
        if not isinstance(terms, list) or not terms:
            raise RecipeError(f"{source}: {where} ({path}) needs 'adapters', a non-empty list of {{adapter, coeff}}.")
        steers = tuple(_steer(term, source, f"{where} adapter {i}", root) for i, term in enumerate(terms, 1))
        compose = _compose(output.get("compose", default_compose), source, where)
        recipe.targets.append(Target(path, steers, compose))
        recipe.pushes.append(_string(output["push"], source, f"{where} push") if output.get("push") is not None else None)
    _refuse_duplicates(recipe)
    return recipe


def _steer(entry: object, source: str, where: str, root: Path) -> Steer:
    term = _mapping(entry, TERM_KEYS, source, where)
    if "adapter" not in term:
        raise RecipeError(f"{source}: {where} has no 'adapter' (a folder or Hub repo id).")
    adapter = _reference(_string(term["adapter"], source, f"{where} adapter"), root, source, f"{where} adapter")
    coeff = term.get("coeff", 1.0)
    if isinstance(coeff, bool) or not isinstance(coeff, (int, float)) or not math.isfinite(coeff):
        raise RecipeError(f"{source}: {where} ({adapter}) has coeff {coeff!r}; it must be a finite number.")
    scheme = _string(term["scheme"], source, f"{where} scheme") if term.get("scheme") is not None else None
    return Steer(adapter, float(coeff), scheme)


def _mapping(value: object, keys: set[str], source: str, where: str) -> dict:
    if not isinstance(value, Mapping):
        raise RecipeError(f"{source}: {where} must be a mapping with keys {', '.join(sorted(keys))}; got {value!r}.")
    unknown = [k for k in value if k not in keys]
    if unknown:
        raise RecipeError(f"{source}: unknown key {unknown[0]!r} in {where}; known keys: {', '.join(sorted(keys))}.")
    return dict(value)


def _string(value: object, source: str, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise RecipeError(f"{source}: {what} must be a non-empty string; got {value!r}.")
    return value


def _compose(value: object, source: str, where: str) -> str:
    if value not in COMPOSE_MODES:
        raise RecipeError(f"{source}: compose in {where} must be one of {', '.join(COMPOSE_MODES)}; got {value!r}.")
    return str(value)


def _reference(ref: str, root: Path, source: str, what: str) -> str:
    """A folder relative to the recipe where one exists there, else a Hub repo id; anything else is refused."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    local = root / Path(ref).expanduser()
    if local.exists():
        return str(local)
    try:
        validate_repo_id(ref)
    except HFValidationError:
        raise RecipeError(f"{source}: {what} {ref!r}: there is no folder {local}, and it is not a Hub repo id.") from None
    return ref


def _refuse_duplicates(recipe: Recipe) -> None:
    seen: dict[str, int] = {}
    for number, target in enumerate(recipe.targets, 1):
        key = os.path.abspath(target.path)
        if key in seen:
            raise RecipeError(f"{recipe.source}: outputs {seen[key]} and {number} both write {target.path}.")
        seen[key] = number
    repos = [repo for repo in recipe.pushes if repo]
    if len(set(repos)) != len(repos):
        raise RecipeError(f"{recipe.source}: two outputs push to the same repo; give each its own.")


def build(
    recipe: str | os.PathLike | Mapping,
    *,
    overwrite: bool = False,
    device: str | None = None,
    verify: bool | None = None,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    progress: bool = False,
    **options,
) -> list[MergeResult]:
    """Write every output of a recipe (file or dict) from one read of the base, then verify and push those that
    name a repo (verify=None: verify only what is pushed). options: gguf, outtype, llama_cpp, task_id, as for
    merge. Returns one MergeResult per output, in the recipe's order."""
    from .pipeline import publish_targets

    parsed = load_recipe(recipe)
    published = publish_targets(
        parsed.targets,
        parsed.pushes,
        base=parsed.base,
        dtype=parsed.dtype,
        device=device,
        overwrite=overwrite,
        verify_outputs=verify,
        private=private,
        revision=revision,
        create_pr=create_pr,
        progress=progress,
        **options,
    )
    return [item.merge for item in published]

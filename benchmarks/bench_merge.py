"""Benchmark: weightsteer's streaming merge against the PEFT path it replaces, with I/O floors.

One run measures, side by side on the same fixture and the same (warm) page cache:
  copy      `cp -r` of the base checkpoint (the I/O floor)
  rewrite   safetensors load_file + save_file of every shard, no math (the issue's floor)
  weightsteer merge at coeff 0.5 (read / compute / write split), at each --layers size
  peft      from_pretrained → PeftModel.from_pretrained → scale λ → merge_and_unload → save_pretrained
Each measurement runs in its own process; peak RSS is that process's ru_maxrss.

    python benchmarks/bench_merge.py                   # the issue's ~0.8B bf16 Llama shape, DeLoRA r=8
    python benchmarks/bench_merge.py --shape 8b --device cuda --peft-device cuda   # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import torch

SHAPES = {  # hidden, layers, intermediate, vocab, heads, kv heads
    "tiny": (256, 4, 688, 4096, 8, 2),
    "0.8b": (2048, 16, 5632, 32000, 32, 4),
    "8b": (4096, 32, 14336, 128256, 32, 8),
}
PROJECTIONS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}
COEFF = 0.5
RANK = 8


def make_fixture(root: Path, shape: str, layers: int, shard_bytes: int) -> tuple[Path, Path]:
    """A random bf16 Llama-shape checkpoint and a perturbed DeLoRA adapter on all seven projections."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    hidden, _, intermediate, vocab, heads, kv_heads = SHAPES[shape]
    base, adapter = root / f"base-{shape}-{layers}", root / f"adapter-{shape}-{layers}"
    if (base / "config.json").exists() and (adapter / "adapter_config.json").exists():
        return base, adapter
    shutil.rmtree(base, ignore_errors=True)
    shutil.rmtree(adapter, ignore_errors=True)
    config = LlamaConfig(
        hidden_size=hidden, num_hidden_layers=layers, intermediate_size=intermediate, vocab_size=vocab,
        num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=False, dtype="bfloat16",
    )
    config.save_pretrained(base)
    torch.manual_seed(0)
    kv = hidden // heads * kv_heads
    out_in = {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, hidden),
              "gate_proj": (intermediate, hidden), "up_proj": (intermediate, hidden), "down_proj": (hidden, intermediate)}
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        prefix = f"model.layers.{i}."
        shapes[prefix + "input_layernorm.weight"] = (hidden,)
        shapes[prefix + "post_attention_layernorm.weight"] = (hidden,)
        for block, names in PROJECTIONS.items():
            for name in names:
                shapes[f"{prefix}{block}.{name}.weight"] = out_in[name]
    largest = max(math.prod(shape) for shape in shapes.values())
    pool = torch.randn(largest + 4096).mul_(0.02).to(torch.bfloat16)  # values for every tensor, at shifted offsets
    adapter_tensors, shard, weight_map, shard_size = {}, {}, {}, 0
    shard_names = []

    def flush():
        name = f"model-{len(shard_names) + 1:05d}.safetensors"
        save_file(shard, base / name, metadata={"format": "pt"})
        shard_names.append(name)
        weight_map.update({k: name for k in shard})
        shard.clear()

    for i, (name, tensor_shape) in enumerate(shapes.items()):
        offset = (i * 977) % 4096
        tensor = pool[offset : offset + math.prod(tensor_shape)].view(tensor_shape).clone()
        if name.endswith("proj.weight"):
            module = "base_model.model." + name.removesuffix(".weight")
            out_features, in_features = tensor_shape
            adapter_tensors[module + ".delora_A"] = torch.randn(RANK, in_features)
            adapter_tensors[module + ".delora_B"] = torch.randn(out_features, RANK)
            adapter_tensors[module + ".delora_lambda"] = torch.tensor([15.0])
            adapter_tensors[module + ".delora_w_norm"] = torch.linalg.norm(tensor.float(), dim=0)
        if shard and shard_size + tensor.nbytes > shard_bytes:
            flush()
            shard_size = 0
        shard[name] = tensor
        shard_size += tensor.nbytes
    flush()
    if len(shard_names) == 1:
        (base / shard_names[0]).rename(base / "model.safetensors")
    else:
        for i, old in enumerate(shard_names):
            new = f"model-{i + 1:05d}-of-{len(shard_names):05d}.safetensors"
            (base / old).rename(base / new)
            weight_map = {k: (new if v == old else v) for k, v in weight_map.items()}
        total = sum(2 * math.prod(shapes[k]) for k in shapes)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (base / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    adapter.mkdir(parents=True)
    save_file(adapter_tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "DELORA", "r": RANK, "delora_lambda": 15, "base_model_name_or_path": str(base),
        "target_modules": [n for names in PROJECTIONS.values() for n in names], "bias": "none",
        "inference_mode": True, "init_weights": True, "lambda_pattern": {}, "rank_pattern": {},
        "module_dropout": 0.0, "task_type": "CAUSAL_LM",
    }
    (adapter / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    return base, adapter


# ---- measurements, each run in a fresh process -------------------------------------------------


def run_copy(base: Path, out: Path, device: str) -> dict:
    subprocess.run(["cp", "-r", str(base), str(out)], check=True)
    return {}


def run_rewrite(base: Path, out: Path, device: str) -> dict:
    from safetensors.torch import load_file, save_file

    out.mkdir()
    for shard in sorted(base.glob("*.safetensors")):
        save_file(load_file(shard), out / shard.name, metadata={"format": "pt"})
    return {}


def run_weightsteer(base: Path, adapter: Path, out: Path, device: str) -> dict:
    import weightsteer

    (result,) = weightsteer.merge_many(adapter, {COEFF: out}, base=base, device=device)
    return {"phases": result.seconds, "changed": len(result.changed_tensors)}


def run_peft(base: Path, adapter: Path, out: Path, device: str) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, device_map=device)
    model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("delora_lambda.default"):
                parameter.mul_(COEFF)
    model.merge_and_unload().save_pretrained(out)
    return {}


def measure(kind: str, *args: str) -> dict:
    """Run one measurement in a fresh Python process; returns seconds and peak RSS."""
    code = (
        "import json, sys, time; from pathlib import Path; sys.path.insert(0, %r); import bench_merge as b; "
        "t = time.perf_counter(); extra = b.run_%s(*[Path(a) for a in sys.argv[1:-1]], sys.argv[-1]); "
        "print(json.dumps({'seconds': time.perf_counter() - t, "
        "'peak_rss_mb': b.peak_rss_mb(), **extra}))"
    ) % (str(Path(__file__).parent), kind)
    done = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def peak_rss_mb() -> float:
    """This process's own high-water RSS (VmHWM). ru_maxrss is not used: Linux carries it across exec from the parent."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def warm_cache(folder: Path) -> None:
    for f in folder.glob("*.safetensors"):
        with open(f, "rb") as handle:
            while handle.read(1 << 26):
                pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="0.8b")
    parser.add_argument("--layers", type=int, nargs="+", help="layer counts for weightsteer's memory check [default: shape's, and half]")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/weightsteer-bench"))
    parser.add_argument("--device", nargs="+", default=["cpu"], help="weightsteer --device (several: one run each)")
    parser.add_argument("--peft-device", default="cpu")
    parser.add_argument("--shard-gb", type=float, default=1.0)
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    full_layers = SHAPES[args.shape][1]
    layer_counts = args.layers or [full_layers, full_layers // 2]
    args.workdir.mkdir(parents=True, exist_ok=True)
    fixtures = {n: make_fixture(args.workdir, args.shape, n, int(args.shard_gb * 2**30)) for n in layer_counts}
    base, adapter = fixtures[layer_counts[0]]
    size_gb = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 1e9
    results = {}

    def timed(label, kind, *paths, device="cpu"):
        out = args.workdir / "out"
        shutil.rmtree(out, ignore_errors=True)
        warm_cache(paths[0])
        results[label] = measure(kind, *map(str, paths), str(out), device)
        shutil.rmtree(out, ignore_errors=True)
        print(f"{label:<24} {results[label]['seconds']:8.2f} s   peak RSS {results[label]['peak_rss_mb']:8.0f} MB", flush=True)

    print(f"fixture: {args.shape} shape, {layer_counts[0]} layers, {size_gb:.2f} GB bf16, DeLoRA r={RANK}, coeff {COEFF}")
    timed("copy (cp -r)", "copy", base)
    timed("rewrite (safetensors)", "rewrite", base)
    for device in args.device:
        for n in layer_counts:
            timed(f"weightsteer {device} {n}L", "weightsteer", fixtures[n][0], fixtures[n][1], device=device)
    if not args.skip_peft:
        timed(f"peft {args.peft_device}", "peft", base, adapter, device=args.peft_device)
    for device in args.device:
        report(results, device, layer_counts, args.peft_device)
    if args.json:
        args.json.write_text(json.dumps({"shape": args.shape, "size_gb": size_gb, "results": results}, indent=2))


def report(results: dict, device: str, layer_counts: list[int], peft_device: str) -> None:
    ours = results[f"weightsteer {device} {layer_counts[0]}L"]
    phases = ours["phases"]
    print(f"-- weightsteer on {device} --")
    print(f"weightsteer phases: read {phases['read']:.2f} s, compute {phases['compute']:.2f} s, write/copy {phases['write']:.2f} s")
    print(f"weightsteer / rewrite floor: {ours['seconds'] / results['rewrite (safetensors)']['seconds']:.2f}x time")
    print(f"weightsteer / cp floor:      {ours['seconds'] / results['copy (cp -r)']['seconds']:.2f}x time")
    peft = results.get(f"peft {peft_device}")
    if peft:
        print(f"peft ({peft_device}) / weightsteer: {peft['seconds'] / ours['seconds']:.2f}x faster, "
              f"RSS ratio weightsteer/peft {ours['peak_rss_mb'] / peft['peak_rss_mb']:.2f}")
    if len(layer_counts) > 1:
        rss = [results[f"weightsteer {device} {n}L"]["peak_rss_mb"] for n in layer_counts]
        print("weightsteer peak RSS by size: " + ", ".join(f"{n} layers {r:.0f} MB" for n, r in zip(layer_counts, rss)))


if __name__ == "__main__":
    main()

"""Benchmark: weightsteer's streaming merge against the PEFT path it replaces, with I/O floors.

One run measures, side by side on the same fixture (built first if missing), each step in a fresh process:
  copy       `cp -r` of the base checkpoint (the I/O floor)
  rewrite    safetensors load_file + save_file of every shard, no math
  weightsteer merge at coeff 0.5 (read / compute / write split), at each --layers size and --device
  peft       from_pretrained → PeftModel.from_pretrained → scale λ → merge_and_unload → save_pretrained
and prints the ratios to the floors. Each step is timed twice: inside its process (the work alone) and as the
whole process from outside (interpreter start and imports included, as a user times a command). Peak RSS is
that process's VmHWM. Optional modes:
  --cold       also `cp -r` and weightsteer (each --device) with the page cache dropped before each run
               (root: sync; echo 3 > /proc/sys/vm/drop_caches; otherwise the base files are evicted with
               posix_fadvise(DONTNEED), which needs no privilege; the run prints which it did)
  --coeffs K…  K outputs from one read (K coeffs), against the floor of one read plus K writes of the bytes
  --cli        whole-process timings of `weightsteer --help`, `schemes`, an argument error and `merge`
  --repeat N   N rounds of every step, interleaved; each step's median run is reported, and the round-by-round
               ratio to the rewrite floor (a shared or virtual machine drifts run to run)

    python benchmarks/bench_merge.py                   # the ~0.8B bf16 Llama shape, DeLoRA r=8, CPU
    python benchmarks/bench_merge.py --cold --coeffs 1 2 4 --cli
    python benchmarks/bench_merge.py --shape 8b --layers 32 8 --device cuda cpu --peft-device cuda --cold --coeffs 1 2 4
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
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


def run_read_write(base: Path, out: Path, device: str, copies: str) -> dict:
    """The floor for K outputs: read every shard once in large pieces, write each piece K times, in 512 KiB
    write() calls as weightsteer makes them (larger calls are slower on VMs with free page reporting; see
    notes/perf.md)."""
    outs = [out / f"k{k}" for k in range(int(copies))]
    for folder in outs:
        folder.mkdir(parents=True)
    buffer = bytearray(64 << 20)
    for shard in sorted(base.glob("*.safetensors")):
        targets = [open(folder / shard.name, "wb", buffering=0) for folder in outs]
        with open(shard, "rb", buffering=0) as source:
            while n := source.readinto(buffer):
                for target in targets:
                    for start in range(0, n, 512 << 10):
                        view = memoryview(buffer)[start : min(n, start + (512 << 10))]
                        while view:
                            view = view[target.write(view) :]
        for target in targets:
            target.close()
    return {}


def run_weightsteer(base: Path, adapter: Path, out: Path, device: str, copies: str = "1") -> dict:
    import weightsteer

    coeffs = [COEFF * (k + 1) for k in range(int(copies))]
    out.mkdir()
    results = weightsteer.merge_many(adapter, {c: out / f"c{c:g}" for c in coeffs}, base=base, device=device)
    return {"phases": results[0].seconds, "changed": len(results[0].changed_tensors)}


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


def measure(kind: str, paths: list[str], rest: list[str]) -> dict:
    """Run one measurement in a fresh Python process: seconds inside it, seconds of the whole process, peak RSS."""
    code = (
        "import json, sys, time; from pathlib import Path; sys.path.insert(0, %r); import bench_merge as b; "
        "t = time.perf_counter(); paths, rest = json.loads(sys.argv[1]); extra = b.run_%s(*map(Path, paths), *rest); "
        "print(json.dumps({'seconds': time.perf_counter() - t, 'peak_rss_mb': b.peak_rss_mb(), 'cpu_seconds': b.cpu_seconds(), **extra}))"
    ) % (str(Path(__file__).parent), kind)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, json.dumps([paths, rest])], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{kind} failed: {done.stderr.strip()[-2000:]}")
    return {"process_seconds": time.perf_counter() - start, **json.loads(done.stdout.strip().splitlines()[-1])}


def cpu_seconds() -> float:
    """CPU time of this process and its children, user + system (a load-independent figure on a shared machine)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


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


def drop_cache(folder: Path) -> str:
    """Empty the page cache of the checkpoint's files; says how."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        pass
    for f in folder.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "posix_fadvise(DONTNEED) on the base files (not root: drop_caches skipped)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="0.8b")
    parser.add_argument("--layers", type=int, nargs="+", help="layer counts for weightsteer's memory check [default: shape's, and half]")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/weightsteer-bench"))
    parser.add_argument("--device", nargs="+", default=["cpu"], help="weightsteer --device (several: one run each)")
    parser.add_argument("--peft-device", default="cpu")
    parser.add_argument("--shard-gb", type=float, default=1.0)
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--cold", action="store_true", help="also measure cp -r and weightsteer on a dropped page cache")
    parser.add_argument("--coeffs", type=int, nargs="+", metavar="K", help="K outputs from one read, on the last --layers fixture")
    parser.add_argument("--cli", action="store_true", help="whole-process timings of the command line")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="run every step N times, in interleaved rounds, and report each step's median run")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    full_layers = SHAPES[args.shape][1]
    layer_counts = args.layers or [full_layers, full_layers // 2]
    args.workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    fixtures = {n: make_fixture(args.workdir, args.shape, n, int(args.shard_gb * 2**30)) for n in layer_counts}
    base, adapter = fixtures[layer_counts[0]]
    size_gb = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 1e9
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, {_gpu_name()}; {time.strftime('%Y-%m-%d')}")
    if args.repeat > 1:
        print(f"every step run {args.repeat} times, in interleaved rounds; each step's median run is shown")
    print(f"fixture: {args.shape} shape, {layer_counts[0]} layers, {size_gb:.2f} GB bf16, DeLoRA r={RANK}, coeff {COEFF} "
          f"(built or found in {time.perf_counter() - start:.0f} s)")
    results: dict[str, dict] = {}

    steps: list[tuple[str, str, tuple[Path, ...], str, tuple[str, ...], bool]] = []  # label, kind, paths, device, extra, cold

    def step(label, kind, *paths, device="cpu", extra=(), cold=False):
        steps.append((label, kind, paths, device, tuple(extra), cold))

    step("copy (cp -r)", "copy", base)
    step("rewrite (safetensors)", "rewrite", base)
    for device in args.device:
        for n in layer_counts:
            step(f"weightsteer {device} {n}L", "weightsteer", *fixtures[n], device=device)
    if not args.skip_peft:
        step(f"peft {args.peft_device}", "peft", base, adapter, device=args.peft_device)
    if args.cold:
        step("copy (cp -r), cold", "copy", base, cold=True)
        for device in args.device:
            step(f"weightsteer {device}, cold", "weightsteer", base, adapter, device=device, cold=True)
    k_base, k_adapter = fixtures[layer_counts[-1]]
    for k in args.coeffs or ():
        step(f"read once + {k} writes, {layer_counts[-1]}L", "read_write", k_base, device="cpu", extra=(str(k),))
        step(f"weightsteer {args.device[0]} {k} coeffs, {layer_counts[-1]}L", "weightsteer", k_base, k_adapter,
             device=args.device[0], extra=(str(k),))
    rounds = run_rounds(steps, args.repeat, args.workdir / "out")
    results: dict[str, dict] = {}
    for label, *_, cold in steps:
        runs = [r[label] for r in rounds if label in r]
        if not runs:
            print(f"{label}: skipped ({rounds[0].get(label + ' failed', 'failed')})")
            continue
        r = results[label] = sorted(runs, key=lambda run: run["seconds"])[len(runs) // 2]
        print(f"{label:<34} {r['seconds']:8.2f} s  (process {r['process_seconds']:6.2f} s, CPU {r['cpu_seconds']:6.2f} s)   "
              f"peak RSS {r['peak_rss_mb']:6.0f} MB" + (f"   [{r['cache']}]" if cold else ""), flush=True)
    results["rounds"] = rounds
    cli = command_line_timings(k_base, k_adapter, args.workdir, args.device[0]) if args.cli else {}
    print()
    for device in args.device:
        report(results, device, layer_counts, args.peft_device)
    for device in args.device if args.cold else ():
        cold, floor = results[f"weightsteer {device}, cold"], results["copy (cp -r), cold"]
        print(f"cold: weightsteer {device} / cold cp -r: {cold['seconds'] / floor['seconds']:.2f}x "
              f"(whole processes {cold['process_seconds'] / floor['process_seconds']:.2f}x)" + _round_by_round(
                  results["rounds"], f"weightsteer {device}, cold", "copy (cp -r), cold"))
    for k in args.coeffs or ():
        ours, floor = results[f"weightsteer {args.device[0]} {k} coeffs, {layer_counts[-1]}L"], results[f"read once + {k} writes, {layer_counts[-1]}L"]
        print(f"K={k}: weightsteer / (one read + {k} writes): {ours['seconds'] / floor['seconds']:.2f}x "
              f"({ours['seconds']:.2f} s vs {floor['seconds']:.2f} s; whole processes {ours['process_seconds'] / floor['process_seconds']:.2f}x)")
    for label, seconds in cli.items():
        print(f"{label:<40} {seconds:6.2f} s (whole process)")
    if args.json:
        args.json.write_text(json.dumps({"shape": args.shape, "size_gb": size_gb, "results": results, "cli": cli}, indent=2))


def run_rounds(steps, repeat: int, out: Path) -> list[dict[str, dict]]:
    """Every step once per round, `repeat` rounds: a machine that drifts (a shared VM) drifts for all steps
    alike, and each round's ratios compare runs minutes apart at most."""
    rounds = []
    for _ in range(repeat):
        done: dict[str, dict] = {}
        for label, kind, paths, device, extra, cold in steps:
            shutil.rmtree(out, ignore_errors=True)
            os.sync()
            how = drop_cache(paths[0]) if cold else warm_cache(paths[0])
            try:
                done[label] = {**measure(kind, [*map(str, paths), str(out)], [device, *extra]), "cache": how}
            except RuntimeError as e:
                if kind != "peft":
                    raise
                done[label + " failed"] = str(e).splitlines()[-1]
            shutil.rmtree(out, ignore_errors=True)
        rounds.append(done)
    return rounds


def _round_by_round(rounds: list[dict[str, dict]], label: str, floor: str) -> str:
    """The ratio of two steps within each round, as a range ('' for a single round)."""
    if len(rounds) < 2:
        return ""
    ratios = sorted(r[label]["seconds"] / r[floor]["seconds"] for r in rounds)
    return f"; round by round {ratios[0]:.2f}-{ratios[-1]:.2f}x (median {ratios[len(ratios) // 2]:.2f}x)"


def command_line_timings(base: Path, adapter: Path, workdir: Path, device: str) -> dict[str, float]:
    """Whole processes as a user runs them (the `weightsteer` entry point is `weightsteer.cli:main`)."""
    command = [sys.executable, "-c", "import sys; from weightsteer.cli import main; sys.argv[0] = 'weightsteer'; main()"]
    out = workdir / "cli-out"
    shutil.rmtree(out, ignore_errors=True)
    runs = {
        "weightsteer --help": ["--help"],
        "weightsteer schemes (first, builds the cache)": ["schemes"],
        "weightsteer schemes": ["schemes"],
        "weightsteer merge (argument error)": ["merge", str(adapter)],
        f"weightsteer merge --device {device} ({base.name})": ["merge", str(adapter), "--base", str(base), "-o", str(out),
                                                              "--coeff", str(COEFF), "--device", device, "-q"],
    }
    timings = {}
    for label, argv in runs.items():
        warm_cache(base)
        start = time.perf_counter()
        done = subprocess.run(command + argv, capture_output=True, text=True)
        timings[label] = time.perf_counter() - start
        if done.returncode not in (0, 2) or (done.returncode == 2) != ("error" in label):
            print(f"{label}: exit {done.returncode}: {done.stderr.strip()[-300:]}")
    shutil.rmtree(out, ignore_errors=True)
    return timings


def _gpu_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"


def report(results: dict, device: str, layer_counts: list[int], peft_device: str) -> None:
    ours = results[f"weightsteer {device} {layer_counts[0]}L"]
    copy, rewrite = results["copy (cp -r)"], results["rewrite (safetensors)"]
    phases = ours["phases"]
    print(f"-- weightsteer on {device} --")
    print(f"weightsteer phases (busy, overlapping): read {phases['read']:.2f} s, compute {phases['compute']:.2f} s, write/copy {phases['write']:.2f} s")
    print(f"weightsteer / rewrite floor: {ours['seconds'] / rewrite['seconds']:.2f}x time (whole processes {ours['process_seconds'] / rewrite['process_seconds']:.2f}x)")
    if rounds := _round_by_round(results["rounds"], f"weightsteer {device} {layer_counts[0]}L", "rewrite (safetensors)"):
        print("  " + rounds.removeprefix("; "))
    print(f"weightsteer / cp floor:      {ours['seconds'] / copy['seconds']:.2f}x time (whole processes {ours['process_seconds'] / copy['process_seconds']:.2f}x)")
    print(f"CPU seconds (whole processes): weightsteer {ours['cpu_seconds']:.2f}, rewrite {rewrite['cpu_seconds']:.2f}, cp {copy['cpu_seconds']:.2f}")
    peft = results.get(f"peft {peft_device}")
    if peft:
        print(f"peft ({peft_device}) / weightsteer: {peft['seconds'] / ours['seconds']:.2f}x faster "
              f"(whole processes {peft['process_seconds'] / ours['process_seconds']:.2f}x), "
              f"RSS ratio weightsteer/peft {ours['peak_rss_mb'] / peft['peak_rss_mb']:.2f}")
    if len(layer_counts) > 1:
        rss = [results[f"weightsteer {device} {n}L"]["peak_rss_mb"] for n in layer_counts]
        print("weightsteer peak RSS by size: " + ", ".join(f"{n} layers {r:.0f} MB" for n, r in zip(layer_counts, rss)))


if __name__ == "__main__":
    main()

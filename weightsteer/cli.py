"""The `weightsteer` command line."""

from __future__ import annotations

import functools
import importlib.util
import json
import sys
from pathlib import Path

import click

from . import __version__
from .adapters import scheme_table
from .errors import WeightsteerError
from .hub import check_push_target, push
from .inspect import format_report, inspect
from .export import export_lora
from .llamacpp import OUTTYPES, check_converter, convert_lora, convert_model
from .pipeline import Published, merge_and_publish, worst_ratio
from .verify import verify


def _fail_cleanly(command):
    """Turn WeightsteerError into a one-line message (or JSON) and exit code 1."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except WeightsteerError as e:
            if kwargs.get("as_json"):
                click.echo(json.dumps({"error": str(e), "type": type(e).__name__}))
            else:
                click.secho(f"error: {e}", fg="red", err=True)
            sys.exit(1)

    return wrapper


class CoeffType(click.ParamType):
    """A coeff: a number, or a KL budget kl:K (positive pole) / -kl:K (negative pole) that a calibration resolves."""

    name = "COEFF"

    def convert(self, value, param, ctx):
        from .sweep import KLTarget, parse_coeff

        if isinstance(value, (float, KLTarget)):
            return value
        try:
            return parse_coeff(value)
        except WeightsteerError as e:
            self.fail(str(e), param, ctx)


def per_coeff(name: str, coeffs: tuple[float, ...]) -> dict[float, str]:
    """One name per coeff: NAME as is for one coeff; NAME-c<coeff> (or a {coeff} placeholder) for several."""
    if "{coeff}" in name:
        return {c: name.format(coeff=f"{c:g}") for c in coeffs}
    if len(coeffs) == 1:
        return {coeffs[0]: name}
    return {c: f"{name}-c{c:g}" for c in coeffs}


def output_paths(output: str, coeffs: tuple[float, ...]) -> dict[float, Path]:
    """One output folder per coeff (see `per_coeff`)."""
    if len(set(coeffs)) != len(coeffs):
        raise click.BadParameter("each --coeff may be given once", param_hint="--coeff")
    return {c: Path(name) for c, name in per_coeff(output, coeffs).items()}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="weightsteer")
def main() -> None:
    """Bake steering adapters (LoRA, DeLoRA, VeRA, IA3, RoAd, ...) into a model's weights at any coeff."""


@main.command()
@click.argument("adapter")
@click.option("-o", "--output", required=True, help="Output folder. With several --coeff: OUTPUT-c<coeff>, or use {coeff} in it.")
@click.option(
    "-c",
    "--coeff",
    "coeffs",
    type=CoeffType(),
    multiple=True,
    default=("1",),
    show_default=True,
    help="Strength; repeat for several checkpoints from one read of the base. kl:K (or -kl:K for the negative pole) "
    "merges at the coeff whose p95 KL to the base is K nats, found first by a calibration (see `weightsteer sweep`).",
)
@click.option("--kl-prompts", type=click.Path(exists=True, dir_okay=False), help="With --coeff kl:K: prompts the calibration measures on, one a line or JSONL with \"prompt\" [default: built-in chat prompts].")
@click.option("--kl-tokens", type=click.IntRange(min=1), default=32, show_default=True, help="With --coeff kl:K: greedy tokens generated per prompt.")
@click.option("--base", help="Base model folder or Hub repo id [default: the adapter's base_model_name_or_path].")
@click.option("--scheme", help="How coeff is read (see `weightsteer schemes`) [default: linear].")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), help="Output dtype [default: the base's].")
@click.option("--device", default="cpu", show_default=True, help="Where the math runs, e.g. cuda.")
@click.option("--task-id", type=int, help="Poly adapters: the task whose skill mix is baked in.")
@click.option("--overwrite", is_flag=True, help="Replace existing output folders.")
@click.option(
    "--verify/--no-verify",
    "verify_mode",
    default=None,
    help="Verify each checkpoint right after merging (see `weightsteer verify`) [default: only with --push]. "
    "With --push, a failed verification pushes nothing; --no-verify pushes unverified and the card says so.",
)
@click.option("--push", "push_to", metavar="REPO", help="Push to this Hub repo id; with several --coeff: REPO-c<coeff>, or use {coeff} in it.")
@click.option("--private", is_flag=True, help="With --push: create the repo private.")
@click.option("--revision", metavar="BRANCH", help="With --push: push to this branch (created from main if missing).")
@click.option("--create-pr", is_flag=True, help="With --push: open a pull request instead of committing to main.")
@click.option("--gguf", is_flag=True, help="Also convert each checkpoint to GGUF (OUTPUT-<outtype>.gguf beside it) with llama.cpp's converter.")
@click.option("--outtype", type=click.Choice(OUTTYPES), default="f32", show_default=True, help="With --gguf: GGUF tensor type.")
@click.option("--llama-cpp", metavar="DIR", help="With --gguf: llama.cpp source folder with convert_hf_to_gguf.py [default: $WEIGHTSTEER_LLAMA_CPP or ~/.cache/weightsteer-compat/llama.cpp].")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar, no summary.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report on stdout.")
@_fail_cleanly
def merge(
    adapter, output, coeffs, kl_prompts, kl_tokens, base, scheme, dtype, device, task_id, overwrite, verify_mode, push_to, private,
    revision, create_pr, gguf, outtype, llama_cpp, quiet, as_json
) -> None:
    """Merge ADAPTER (folder or Hub repo id) into its base model and write standalone checkpoints.

    \b
    Examples:
      weightsteer merge ./honest-adapter --coeff 0.5 -o ./model-honest
      weightsteer merge ./honest-adapter --coeff -1 --coeff 1 -o ./model-honest
      weightsteer merge user/ia3-adapter --scheme power --coeff -1 -o ./inverse --base ./base-model
      weightsteer merge ./honest-adapter --coeff 0.5 -o ./model-honest --verify
      weightsteer merge ./honest-adapter --coeff 0.5 -o ./model-honest --push user/model-honest --private
      weightsteer merge ./honest-adapter --coeff -1 --coeff 1 -o ./model-honest --gguf --outtype q8_0
      weightsteer merge ./honest-adapter --coeff kl:1.0 --coeff=-kl:1.0 -o ./model-honest
    """
    progress = not (quiet or as_json)
    coeffs, calibrations = _resolve_kl_coeffs(
        adapter, coeffs, output=output, push_to=push_to, overwrite=overwrite, revision=revision, create_pr=create_pr,
        kl_prompts=kl_prompts, tokens=kl_tokens, base=base, scheme=scheme, dtype=dtype, device=device, task_id=task_id,
        progress=progress,
    )
    paths = output_paths(output, coeffs)
    repos = _push_targets(push_to, coeffs, private=private, revision=revision, create_pr=create_pr)
    published = merge_and_publish(
        adapter,
        paths,
        base=base,
        scheme=scheme,
        dtype=dtype,
        device=device,
        task_id=task_id,
        overwrite=overwrite,
        verify_outputs=verify_mode,
        push_to=repos,
        private=private,
        revision=revision,
        create_pr=create_pr,
        gguf=gguf,
        outtype=outtype,
        llama_cpp=llama_cpp,
        progress=progress,
        calibrations=calibrations,
    )
    for item in published:
        for warning in item.merge.warnings:
            click.secho(f"warning: {warning}", fg="yellow", err=True)
    if as_json:
        click.echo(json.dumps([item.to_dict() for item in published], indent=2))
    elif not quiet:
        for item in published:
            _print_published(item, outtype)


def _resolve_kl_coeffs(
    adapter, coeffs, *, output, push_to, overwrite, revision, create_pr, kl_prompts, **calibration
) -> tuple[tuple[float, ...], dict[float, dict]]:
    """kl:K coeffs → the coeffs a calibration finds (after the checks that need no coeff, so those fail fast)."""
    from .outputs import check_output
    from .pipeline import calibrate_coeffs
    from .sweep import KLTarget, read_prompts

    if not any(isinstance(c, KLTarget) for c in coeffs):
        if kl_prompts:
            raise click.UsageError("--kl-prompts goes with --coeff kl:K.")
        return coeffs, {}
    if push_to:
        check_push_target(push_to.replace("{coeff}", "1"), revision=revision, create_pr=create_pr)
    if len(coeffs) == 1 and "{coeff}" not in output:
        check_output(Path(output), overwrite)
    prompts = read_prompts(kl_prompts) if kl_prompts else None
    found, calibrations = calibrate_coeffs(adapter, coeffs, prompts=prompts, **calibration)
    return tuple(found), calibrations


def _print_published(item: Published, outtype: str) -> None:
    r = item.merge
    click.echo(
        f"wrote {r.path}  (coeff {r.coeff:g}, scheme {r.scheme}, {len(r.changed_tensors)} tensors changed; "
        f"{r.rounding.swallowed_share:.1%} of changed elements lost to rounding)"
    )
    if item.calibration:
        cal = item.calibration
        click.echo(
            f"calibrated {r.path}: coeff {r.coeff:g} gives p95 KL {cal['point']['kl_p95']:.3g} nat "
            f"(target {cal['target_kl']:g}) on {cal['prompts']} prompts × {cal['tokens']} tokens"
        )
    if item.gguf:
        click.echo(f"wrote {item.gguf.path}  (GGUF {outtype}, llama.cpp's convert_hf_to_gguf.py)")
    if item.verification:
        click.echo(f"verified {r.path}: passed, worst tensor at {worst_ratio(item.verification):.3g}× its tolerance")
    if item.url:
        click.echo(f"pushed {r.path} to {item.url}")


def _push_targets(
    push_to: str | None, coeffs: tuple[float, ...], *, private: bool, revision: str | None, create_pr: bool
) -> dict[float, str]:
    """Repo id per coeff (checked by the pipeline before any merge work starts)."""
    if push_to is None:
        if private or revision or create_pr:
            raise click.UsageError("--private, --revision and --create-pr go with --push.")
        return {}
    return per_coeff(push_to, coeffs)


def _coeff_list(ctx, param, value: str | None) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        return tuple(float(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers, e.g. -1,-0.5,0,0.5,1.") from None


@main.command("sweep")
@click.argument("adapter")
@click.option("--coeffs", callback=_coeff_list, metavar="C,C,...", help="Coeffs to measure, comma-separated (write --coeffs=-2,-1,... for negative first values) [default: -2,-1.5,-1,-0.5,-0.25,0,0.25,0.5,1,1.5,2].")
@click.option("--prompts", type=click.Path(exists=True, dir_okay=False), help="Prompts, one a line or JSONL with a \"prompt\" field [default: built-in neutral chat prompts].")
@click.option("--tokens", type=click.IntRange(min=1), default=32, show_default=True, help="Greedy tokens generated per prompt.")
@click.option("--pairs", type=click.Path(exists=True, dir_okay=False), help="JSONL with prompt, positive, negative: adds the margin log p(positive) − log p(negative).")
@click.option("--target-kl", type=click.FloatRange(min=0, min_open=True), metavar="K", help="Find c_pos / c_neg whose p95 KL to the base is K nats (within 2 %), up to |c| = 8.")
@click.option("--base", help="Base model folder or Hub repo id [default: the adapter's base_model_name_or_path].")
@click.option("--scheme", help="How coeff is read (see `weightsteer schemes`) [default: linear].")
@click.option("--device", help="Where the model runs [default: cuda if available, else cpu].")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), help="Model dtype [default: float32 on the CPU, the base's elsewhere].")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Prompts per forward.")
@click.option("--chat-template/--no-chat-template", default=True, help="Wrap prompts in the tokenizer's chat template when it has one [default: on].")
@click.option("--task-id", type=int, help="Poly adapters: the task whose skill mix is measured.")
@click.option("-o", "--output", metavar="DIR", help="Folder for sweep.json, sweep.png, report.md [default: ./sweep-<adapter folder name>].")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar, no table.")
@click.option("--json", "as_json", is_flag=True, help="Print sweep.json's object on stdout.")
@_fail_cleanly
def sweep_command(
    adapter, coeffs, prompts, tokens, pairs, target_kl, base, scheme, device, dtype, batch_size, chat_template, task_id, output, quiet,
    as_json
) -> None:
    """Measure what each coeff of ADAPTER does, without writing a checkpoint, and plot it.

    For every coeff, the adapter at that strength (the runtime twin of a merge) decodes greedily on each
    prompt; at every generated position the KL of its next-token distribution to the base's (adapter off)
    is measured, plus how surprising the text is to the base (nll_base), its bigram diversity (distinct2)
    and, with --pairs, the log-prob margin of positive over negative completions. --target-kl K finds the
    coeff of each pole whose p95 KL is K nats; `merge --coeff kl:K` merges there.

    \b
    Examples:
      weightsteer sweep ./honest-adapter
      weightsteer sweep ./honest-adapter --coeffs=-2,-1,-0.5,0,0.5,1,2 --prompts prompts.txt --pairs pairs.jsonl --target-kl 1.0 -o ./sweep-honest
      weightsteer merge ./honest-adapter --coeff kl:1.0 --coeff=-kl:1.0 -o ./honest
    """
    from .sweep import DEFAULT_COEFFS, PLOT_HINT, check_sweep_folder, read_pairs, read_prompts, sweep

    folder = check_sweep_folder(output or f"sweep-{Path(adapter.rstrip('/')).name}")
    report = sweep(
        adapter,
        coeffs=coeffs or DEFAULT_COEFFS,
        prompts=read_prompts(prompts) if prompts else None,
        tokens=tokens,
        pairs=read_pairs(pairs) if pairs else None,
        target_kl=target_kl,
        base=base,
        scheme=scheme,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        chat_template=chat_template,
        task_id=task_id,
        progress=not (quiet or as_json),
    )
    plot = importlib.util.find_spec("matplotlib") is not None
    written = report.write(folder, plot=plot)
    if not plot:
        click.secho(f"warning: {folder}/sweep.png not written: the plot needs matplotlib: {PLOT_HINT}", fg="yellow", err=True)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    elif not quiet:
        click.echo(report.table())
        click.echo(f"wrote {', '.join(str(p) for p in written)}")


@main.command("verify")
@click.argument("merged", type=click.Path(exists=True, file_okay=False))
@click.option("--adapter", help="Adapter folder or Hub repo id [default: from MERGED/weightsteer.json].")
@click.option("-c", "--coeff", type=float, help="Strength the checkpoint was merged at [default: from MERGED/weightsteer.json].")
@click.option("--base", help="Base model folder or Hub repo id [default: from MERGED/weightsteer.json].")
@click.option("--scheme", help="Coeff scheme of the merge [default: from MERGED/weightsteer.json].")
@click.option("--task-id", type=int, help="Poly adapters: the task baked in [default: from MERGED/weightsteer.json].")
@click.option(
    "--atol",
    type=float,
    help="Absolute tolerance for module outputs and logits [default: from the dtype: what rounding the merged "
    "weight explains, per module; 1e-3 / 0.1 / 0.5 on logits for float32 / float16 / bfloat16].",
)
@click.option(
    "--logits", is_flag=True, help="Also run the unmerged (base + PEFT) and the merged model on prompts and compare logits."
)
@click.option(
    "--prompts",
    type=click.Path(exists=True, dir_okay=False),
    help="Prompts for --logits (implies it), one per line; token ids such as '1 5 9' when the model has no tokenizer.",
)
@click.option("--device", default="cpu", show_default=True, help="Where the module checks run, e.g. cuda.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar, no summary; the exit code tells.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report on stdout.")
@_fail_cleanly
def verify_command(merged, adapter, coeff, base, scheme, task_id, atol, logits, prompts, device, quiet, as_json) -> None:
    """Check that MERGED computes what its adapter computes at its coeff; exit 1 if not.

    Every adapted module is run through PEFT's own forward at the coeff and through the merged weight on
    random probes; errors beyond what rounding to the dtype explains fail, and so does any other tensor
    that differs from the base.

    \b
    Examples:
      weightsteer verify ./model-honest
      weightsteer verify ./model-honest --logits --prompts prompts.txt
      weightsteer verify ./merged --adapter ./honest-adapter --coeff 0.5 --base ./base-model --json
    """
    prompt_lines = [line for line in Path(prompts).read_text().splitlines() if line.strip()] if prompts else None
    report = verify(
        merged,
        adapter,
        coeff,
        base=base,
        scheme=scheme,
        task_id=task_id,
        atol=atol,
        logits=logits,
        prompts=prompt_lines,
        device=device,
        progress=not (quiet or as_json),
    )
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    elif not quiet:
        click.echo(report.summary())
    if not report.ok:
        if not as_json:
            click.secho(f"error: {report.failure_message()}", fg="red", err=True)
        sys.exit(1)


@main.command("push")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private.")
@click.option("--revision", metavar="BRANCH", help="Push to this branch (created from main if missing).")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to main.")
@click.option("--no-verify", is_flag=True, help="Push without verifying first; the card says so.")
@click.option("--device", default="cpu", show_default=True, help="Where the verification runs, e.g. cuda.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars, no summary.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report on stdout.")
@_fail_cleanly
def push_command(folder, repo_id, private, revision, create_pr, no_verify, device, quiet, as_json) -> None:
    """Verify the merged checkpoint in FOLDER, write its card, and upload it to the Hub repo REPO_ID.

    The repo is created if needed. The token comes from HF_TOKEN or `hf auth login`; it is never printed.
    A failed verification pushes nothing.

    \b
    Examples:
      weightsteer push ./model-honest user/model-honest
      weightsteer push ./model-honest user/model-honest --private --revision experiments
      weightsteer push ./model-honest user/model-honest --create-pr
    """
    check_push_target(repo_id, revision=revision, create_pr=create_pr)
    progress = not (quiet or as_json)
    report = None if no_verify else verify(folder, device=device, progress=progress)
    options = dict(private=private, revision=revision, create_pr=create_pr, progress=progress)
    url = push(folder, repo_id, verify=report or False, **options)
    if as_json:
        click.echo(json.dumps({"url": url, "verification": report.to_dict() if report else None}, indent=2))
    elif not quiet:
        click.echo(f"pushed {folder} to {url}")


@main.command("gguf")
@click.argument("model", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--output", help="GGUF file to write [default: MODEL-<outtype>.gguf beside the folder].")
@click.option("--outtype", type=click.Choice(OUTTYPES), default="f32", show_default=True, help="GGUF tensor type.")
@click.option("--lora-base", metavar="BASE", help="MODEL is a PEFT LoRA folder (e.g. from export-lora): convert it with convert_lora_to_gguf.py against this base model folder.")
@click.option("--llama-cpp", metavar="DIR", help="llama.cpp source folder with the converters [default: $WEIGHTSTEER_LLAMA_CPP or ~/.cache/weightsteer-compat/llama.cpp].")
@click.option("--python", "python", metavar="PYTHON", help="Interpreter that runs the converter (needs torch, transformers, sentencepiece) [default: $WEIGHTSTEER_CONVERTER_PYTHON or this one].")
@click.option("--overwrite", is_flag=True, help="Replace an existing GGUF file.")
@click.option("-q", "--quiet", is_flag=True, help="No summary.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report on stdout.")
@_fail_cleanly
def gguf_command(model, output, outtype, lora_base, llama_cpp, python, overwrite, quiet, as_json) -> None:
    """Convert a merged checkpoint (or, with --lora-base, an exported LoRA) to GGUF for llama.cpp.

    Runs llama.cpp's own converter (convert_hf_to_gguf.py / convert_lora_to_gguf.py with its vendored gguf-py);
    when it is missing, the error says how to get it.

    \b
    Examples:
      weightsteer gguf ./model-honest                          # -> ./model-honest-f32.gguf
      weightsteer gguf ./model-honest --outtype q8_0 -o honest.q8_0.gguf
      weightsteer gguf ./honest-lora --lora-base ./base-model   # -> ./honest-lora-f32.gguf
      llama-cli -m base.gguf --lora-scaled honest-lora-f32.gguf:-1 ...
    """
    options = dict(outtype=outtype, llama_cpp=llama_cpp, python=python, overwrite=overwrite)
    if lora_base:
        result = convert_lora(model, lora_base, output, **options)
    else:
        result = convert_model(model, output, **options)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    elif not quiet:
        click.echo(f"wrote {result.path}  (GGUF {result.kind}, {outtype})")


@main.command("export-lora")
@click.argument("adapter")
@click.option("-o", "--output", required=True, help="Output folder (a PEFT LoRA adapter).")
@click.option("-c", "--coeff", type=float, default=1.0, show_default=True, help="Strength baked into the LoRA.")
@click.option("--base", help="Base model folder or Hub repo id [default: the adapter's base_model_name_or_path].")
@click.option("--scheme", help="How coeff is read (see `weightsteer schemes`) [default: linear].")
@click.option("--rank", type=int, help="At most this rank per module (truncated SVD where a module's change has more).")
@click.option("--energy", type=float, help="Per module, the smallest rank keeping this share of ‖ΔW‖² (0 < E ≤ 1) [default: exact factors whole; an SVD keeps its numerical rank if ≤ 64, else 0.99].")
@click.option("--task-id", type=int, help="Poly adapters: the task whose skill mix is exported.")
@click.option("--gguf", is_flag=True, help="Also write OUTPUT-<outtype>.gguf with llama.cpp's convert_lora_to_gguf.py.")
@click.option("--outtype", type=click.Choice(OUTTYPES), default="f32", show_default=True, help="With --gguf: GGUF tensor type.")
@click.option("--llama-cpp", metavar="DIR", help="With --gguf: llama.cpp source folder [default: $WEIGHTSTEER_LLAMA_CPP or ~/.cache/weightsteer-compat/llama.cpp].")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar, no summary.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report on stdout.")
@_fail_cleanly
def export_lora_command(adapter, output, coeff, base, scheme, rank, energy, task_id, gguf, outtype, llama_cpp, overwrite, quiet, as_json) -> None:
    """Write ADAPTER at COEFF as a plain PEFT LoRA, for runtimes that steer with LoRAs (vLLM, llama.cpp).

    Low-rank changes (LoRA, rsLoRA, DeLoRA, VeRA, AdaLoRA, LoHa, ...) are factored exactly; others (IA3, RoAd,
    OFT, DoRA with its magnitude, ...) by a truncated SVD whose relative error is reported per module. Every
    module gets the same rank and scale 1 (lora_alpha = r). Where the change is linear in coeff (the linear
    scheme of LoRA, DeLoRA, VeRA, IA3, ...), a runtime LoRA scale s acts as coeff s·COEFF, negative too.

    \b
    Examples:
      weightsteer export-lora ./honest-adapter -o ./honest-lora
      weightsteer export-lora ./honest-dora -o ./honest-lora --coeff -1 --energy 0.999
      weightsteer export-lora ./honest-ia3 -o ./honest-lora --rank 32 --gguf --base ./base-model
      vllm serve ./base-model --enable-lora --lora-modules honest=./honest-lora
      llama-cli -m base.gguf --lora-scaled honest-lora-f32.gguf:-1 -p "..."
    """
    if gguf:
        check_converter(llama_cpp)
    result = export_lora(
        adapter,
        output,
        coeff=coeff,
        base=base,
        scheme=scheme,
        rank=rank,
        energy=energy,
        task_id=task_id,
        overwrite=overwrite,
        progress=not (quiet or as_json),
    )
    for warning in result.warnings:
        click.secho(f"warning: {warning}", fg="yellow", err=True)
    converted = None
    if gguf:
        converted = convert_lora(output, result.base, outtype=outtype, llama_cpp=llama_cpp, overwrite=overwrite)
    if as_json:
        click.echo(json.dumps(result.to_dict() | {"gguf": converted.to_dict() if converted else None}, indent=2))
    elif not quiet:
        click.echo(result.summary())
        if converted:
            click.echo(f"wrote {converted.path}  (GGUF LoRA, {outtype})")


@main.command("inspect")
@click.argument("adapter")
@click.option("--base", help="Base model folder or Hub repo id: adds ‖ΔW‖/‖W‖ per changed tensor at coeff 1.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_fail_cleanly
def inspect_command(adapter, base, as_json) -> None:
    """Show an adapter's type, targets, ranks, coeff scheme and whether (and how) it merges.

    \b
    Examples:
      weightsteer inspect ./honest-adapter
      weightsteer inspect ./honest-adapter --base ./Llama-3.2-1B --json
    """
    report = inspect(adapter, base)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else format_report(report))


@main.command()
def schemes() -> None:
    """List every adapter type's coeff schemes as a Markdown table."""
    click.echo(scheme_table())

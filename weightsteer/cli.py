"""The `weightsteer` command line."""

from __future__ import annotations

import functools
import importlib.util
import json
import string
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

import click

from . import __version__
from .errors import WeightsteerError, redact
from .llamacpp import OUTTYPES

# Only click, the standard library and weightsteer's light modules (errors, llamacpp) are imported here:
# `weightsteer --help` and argument errors must answer without loading torch, transformers or peft.
# Each command imports what it needs.
if TYPE_CHECKING:
    from .pipeline import Published


BASE_ID_HELP = "The base's Hub repo id, for the card's base_model link when the base is a local folder."

# Library messages name Python arguments; the CLI names its flags.
CLI_WORDING = {
    "overwrite=True": "--overwrite",
    "dtype='bfloat16'": "--dtype bfloat16",
    "adapter= / coeff=": "--adapter / --coeff",
    "adapter= / base=": "--adapter / --base",
}


def cli_wording(text: str) -> str:
    """A library message as the CLI prints it: flags instead of arguments, and no secret."""
    for argument, flag in CLI_WORDING.items():
        text = text.replace(argument, flag)
    return redact(text)


def _fail_cleanly(command):
    """Turn WeightsteerError into a one-line message (or JSON) and exit code 1. Anything else is a bug: its
    traceback is printed redacted (a library's message may quote the token), also exit code 1."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except WeightsteerError as e:
            message = cli_wording(str(e))
            if kwargs.get("as_json"):
                click.echo(json.dumps({"error": message, "type": type(e).__name__}))
            else:
                click.secho(f"error: {message}", fg="red", err=True)
            sys.exit(1)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception:
            click.echo(redact(traceback.format_exc()), err=True)
            click.secho("error: weightsteer failed unexpectedly (a bug: please report the traceback above).", fg="red", err=True)
            sys.exit(1)

    return wrapper


def coeff_text(c: float) -> str:
    """The shortest text that reads back as exactly this coeff: 0.1 → "0.1", 1.0 → "1", 1e-12 → "1e-12"."""
    text = repr(float(c))
    return text[:-2] if text.endswith(".0") else text


class CoeffType(click.ParamType):
    """A coeff: a number, or a KL budget kl:K (positive pole) / -kl:K (negative pole) that a calibration resolves."""

    name = "COEFF"

    def convert(self, value, param, ctx):
        from .calibration import KLTarget, read_coeff

        if isinstance(value, (float, KLTarget)):
            return value
        try:
            return read_coeff(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


def per_coeff(name: str, coeffs: tuple[float, ...]) -> dict[float, str]:
    """One name per coeff: NAME as is for one coeff; NAME-c<coeff> (or a {coeff} placeholder) for several.

    Coeffs are written so that they read back exactly (0.1 and 0.1000001 get different names); names that
    still collide are refused before any work."""
    pieces = _placeholder_pieces(name)
    if len(pieces) > 1:
        names = {c: coeff_text(c).join(pieces) for c in coeffs}
    elif len(coeffs) == 1:
        names = {coeffs[0]: pieces[0]}
    else:
        names = {c: f"{pieces[0]}-c{coeff_text(c)}" for c in coeffs}
    if len(set(names.values())) != len(names):
        raise click.BadParameter(f"two coeffs would get the same name from {name!r}", param_hint="--coeff")
    return names


def _placeholder_pieces(name: str) -> list[str]:
    """NAME split at its {coeff} placeholders ({{ and }} stand for braces); any other field is refused."""
    pieces, current = [], ""
    try:
        for literal, field, spec, conversion in string.Formatter().parse(name):
            current += literal
            if field is None:
                continue
            if field != "coeff" or spec or conversion:
                raise click.BadParameter(f"{name!r}: only {{coeff}} may stand in braces (found {{{field}}}); write {{{{ and }}}} for literal braces.")
            pieces.append(current)
            current = ""
    except ValueError as e:  # an unmatched brace
        raise click.BadParameter(f"{name!r}: {e}; write {{{{ and }}}} for literal braces, {{coeff}} for the coeff.") from None
    return [*pieces, current]


def composition_name(name: str, hint: str) -> str:
    """NAME for the one output of several adapters: {coeff} has no single value there ({{ and }} are braces)."""
    pieces = _placeholder_pieces(name)
    if len(pieces) > 1:
        raise click.BadParameter(
            f"{name!r}: {{coeff}} goes with one ADAPTER and its --coeff values; several ADAPTER@COEFF make one output", param_hint=hint
        )
    return pieces[0]


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
@click.argument("adapters", nargs=-1, required=True, metavar="ADAPTER[@COEFF]...")
@click.option("-o", "--output", help="Output folder. With several --coeff: OUTPUT-c<coeff>, or use {coeff} in it. [default with --push: ./<repo name>]")
@click.option(
    "-c",
    "--coeff",
    "coeffs",
    type=CoeffType(),
    multiple=True,
    help="Strength; repeat for several checkpoints from one read of the base [default: 1]. kl:K (-kl:K for the negative "
    "pole) merges at the coeff whose p95 KL to the base is K nats, found first by a calibration (see `weightsteer sweep`).",
)
@click.option("--kl-prompts", type=click.Path(exists=True, dir_okay=False), help="With --coeff kl:K: prompts the calibration measures on, one a line or JSONL with \"prompt\" [default: built-in chat prompts].")
@click.option("--kl-tokens", type=click.IntRange(min=1), default=32, show_default=True, help="With --coeff kl:K: greedy tokens generated per prompt.")
@click.option("--base", help="Base model folder or Hub repo id [default: the adapters' base_model_name_or_path].")
@click.option("--base-id", metavar="ORG/NAME", help=BASE_ID_HELP)
@click.option("--scheme", help="How coeff is read (see `weightsteer schemes`), for every adapter [default: linear].")
@click.option(
    "--compose",
    type=click.Choice(["chain", "sum"]),
    default="chain",
    show_default=True,
    help="Several adapters: chain applies them in order (one family adds up as PEFT runs them together); "
    "sum is W + Σ (Wᵢ − W), each against the base.",
)
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
    adapters, output, coeffs, kl_prompts, kl_tokens, base, base_id, scheme, compose, dtype, device, task_id, overwrite, verify_mode,
    push_to, private, revision, create_pr, gguf, outtype, llama_cpp, quiet, as_json
) -> None:
    """Merge ADAPTER (folder or Hub repo id) into its base model and write standalone checkpoints.

    Several adapters, each at its own coeff (ADAPTER@COEFF), make one checkpoint from one pass; for many
    such checkpoints from one read of the base, write a recipe (`weightsteer build`).

    ADAPTER may also be a steering artefact's file or folder, detected from its content: cwsteer, AntiPaSTO /
    InnerPiSSA, weight-steering w.pt, a llama.cpp control-vector GGUF or a steering-lite vector (see `weightsteer
    schemes`); vectors become biases after their block, and compose with other adapters like any term.

    \b
    Examples:
      weightsteer merge ./honest-adapter --coeff 0.5 -o ./model-honest
      weightsteer merge ./honest-adapter --coeff -1 --coeff 1 -o ./model-honest
      weightsteer merge ./honest@0.5 ./formal@-0.3 -o ./honest-formal
      weightsteer merge ./pos@1 ./neg@-1 -o ./contrast
      weightsteer merge user/ia3-adapter --scheme power --coeff -1 -o ./inverse --base ./base-model
      weightsteer merge ./honest-adapter --coeff 0.5 -o ./model-honest --verify
      weightsteer merge ./honest-adapter --coeff 0.5 -o ./model-honest --push user/model-honest --private
      weightsteer merge ./honest-adapter --coeff 0.5 --push user/model-honest     # writes ./model-honest first
      weightsteer merge ./honest-adapter --coeff -1 --coeff 1 -o ./model-honest --gguf --outtype q8_0
      weightsteer merge honesty.gguf --base ./Llama-3.2-1B --coeff 4 -o ./model-honest
      weightsteer merge ./honest-adapter --coeff kl:1.0 --coeff=-kl:1.0 -o ./model-honest
    """
    output = output if output is not None else _output_from_push(push_to)  # before the heavy imports
    from .merge import Steer, Target
    from .pipeline import publish_targets

    terms = [_term(a) for a in adapters]
    progress = not (quiet or as_json)
    calibrations = {}
    if len(terms) == 1 and terms[0][1] is None:
        coeffs, calibrations = _resolve_kl_coeffs(
            terms[0][0], coeffs or (1.0,), output=output, push_to=push_to, overwrite=overwrite, revision=revision,
            create_pr=create_pr, kl_prompts=kl_prompts, tokens=kl_tokens, base=base, scheme=scheme, dtype=dtype,
            device=device, task_id=task_id, progress=progress,
        )
        paths = output_paths(output, coeffs)
        repos = _push_targets(push_to, tuple(paths), private=private, revision=revision, create_pr=create_pr)
        targets = [Target(path, (Steer(terms[0][0], c, scheme),), compose) for c, path in paths.items()]
        pushes = [repos.get(c) for c in paths]
    else:
        if coeffs:
            raise click.UsageError(
                "--coeff goes with a single ADAPTER; give each of several adapters its own coeff as ADAPTER@COEFF "
                "(e.g. ./honest@0.5 ./formal@-0.3), or write a recipe for many outputs (`weightsteer build --help`)."
            )
        if push_to is None:
            _push_targets(None, (), private=private, revision=revision, create_pr=create_pr)  # refuses --private alone
        steers = tuple(Steer(ref, 1.0 if c is None else c, scheme) for ref, c in terms)
        targets = [Target(Path(composition_name(output, "--output")), steers, compose)]
        pushes = [composition_name(push_to, "--push") if push_to is not None else None]
    published = publish_targets(
        targets,
        pushes,
        base=base,
        base_id=base_id,
        dtype=dtype,
        device=device,
        task_id=task_id,
        overwrite=overwrite,
        verify_outputs=verify_mode,
        private=private,
        revision=revision,
        create_pr=create_pr,
        gguf=gguf,
        outtype=outtype,
        llama_cpp=llama_cpp,
        progress=progress,
        calibrations=[calibrations.get(target.steers[0].coeff) for target in targets] if calibrations else (),
    )
    _report(published, outtype, quiet, as_json)


def _resolve_kl_coeffs(
    adapter, coeffs, *, output, push_to, overwrite, revision, create_pr, kl_prompts, **calibration
) -> tuple[tuple[float, ...], dict[float, dict]]:
    """kl:K coeffs → the coeffs a calibration finds (after the checks that need no coeff, so those fail fast)."""
    from .calibration import KLTarget

    if not any(isinstance(c, KLTarget) for c in coeffs):
        if kl_prompts:
            raise click.UsageError("--kl-prompts goes with --coeff kl:K.")
        return coeffs, {}
    from .hub import check_push_target
    from .outputs import check_existing
    from .pipeline import calibrate_coeffs
    from .sweep import read_prompts

    if push_to:
        check_push_target(push_to.replace("{coeff}", "1"), revision=revision, create_pr=create_pr)
    if len(coeffs) == 1 and len(_placeholder_pieces(output)) == 1:
        check_existing(Path(output), overwrite)
    prompts = read_prompts(kl_prompts) if kl_prompts else None
    found, calibrations = calibrate_coeffs(adapter, coeffs, prompts=prompts, **calibration)
    return tuple(found), calibrations


def _term(argument: str) -> tuple[str, float | None]:
    """ADAPTER@COEFF → (ADAPTER, COEFF); a plain ADAPTER (or an existing folder whose name has an @) → (ADAPTER, None)."""
    ref, at, coeff = argument.rpartition("@")
    if not at or Path(argument).exists():
        return argument, None
    try:
        return ref, float(coeff)
    except ValueError:
        raise click.BadParameter(
            f"{argument!r}: ADAPTER@COEFF needs a number after the last @ (e.g. ./honest@0.5)", param_hint="ADAPTER"
        ) from None


def _report(published: list[Published], outtype: str, quiet: bool, as_json: bool) -> None:
    for item in published:
        for warning in item.merge.warnings:
            click.secho(f"warning: {cli_wording(warning)}", fg="yellow", err=True)
    if as_json:
        click.echo(json.dumps([item.to_dict() for item in published], indent=2))
    elif not quiet:
        for item in published:
            _print_published(item, outtype)


@main.command("build")
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.option("--base-id", metavar="ORG/NAME", help=BASE_ID_HELP)
@click.option("--device", default="cpu", show_default=True, help="Where the math runs, e.g. cuda.")
@click.option("--overwrite", is_flag=True, help="Replace existing output folders.")
@click.option(
    "--verify/--no-verify",
    "verify_mode",
    default=None,
    help="Verify every output [default: only those with push:]; a failed verification pushes nothing.",
)
@click.option("--private", is_flag=True, help="Outputs with push: create the repos private.")
@click.option("--revision", metavar="BRANCH", help="Outputs with push: push to this branch.")
@click.option("--create-pr", is_flag=True, help="Outputs with push: open pull requests instead of committing to main.")
@click.option("--gguf", is_flag=True, help="Also convert each output to GGUF with llama.cpp's converter.")
@click.option("--outtype", type=click.Choice(OUTTYPES), default="f32", show_default=True, help="With --gguf: GGUF tensor type.")
@click.option("--llama-cpp", metavar="DIR", help="With --gguf: llama.cpp source folder with convert_hf_to_gguf.py.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar, no summary.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report on stdout.")
@_fail_cleanly
def build_command(recipe, base_id, device, overwrite, verify_mode, private, revision, create_pr, gguf, outtype, llama_cpp, quiet, as_json) -> None:
    """Write every output of RECIPE (YAML, or JSON with the same keys) from one read of the base.

    Each output lists adapters, each at its own coeff (and scheme); outputs with push: are verified, then
    pushed. Relative paths are relative to the recipe file. Every key, path and coeff is checked first.

    \b
    Example recipe:
      base: ./base                # optional: the adapters' common base by default
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
          push: user/honest-full
    """
    from .pipeline import publish_targets
    from .recipe import load_recipe

    parsed = load_recipe(recipe)
    published = publish_targets(
        parsed.targets,
        parsed.pushes,
        base=parsed.base,
        base_id=base_id,
        dtype=parsed.dtype,
        device=device,
        overwrite=overwrite,
        verify_outputs=verify_mode,
        private=private,
        revision=revision,
        create_pr=create_pr,
        gguf=gguf,
        outtype=outtype,
        llama_cpp=llama_cpp,
        progress=not (quiet or as_json),
    )
    _report(published, outtype, quiet, as_json)


def _print_published(item: Published, outtype: str) -> None:
    from .outputs import PROVENANCE_NAME
    from .pipeline import worst_ratio

    r = item.merge
    what = f"coeff {r.coeff:g}, scheme {r.scheme}" if r.coeff is not None else " + ".join(
        f"{t.adapter}@{t.coeff:g} ({t.scheme})" for t in r.terms
    )
    click.echo(
        f"wrote {r.path}  ({what}, {len(r.changed_tensors)} tensors changed; "
        f"{r.rounding.swallowed_share:.1%} of changed elements lost to rounding)"
    )
    if r.dropped_files:
        click.echo(f"  not copied from the base (weights the merge did not rewrite): {', '.join(r.dropped_files)}")
    provenance = json.loads((r.path / PROVENANCE_NAME).read_text())
    if not provenance.get("base_model_id"):
        click.echo(
            f"  its card has no base_model link: the base {provenance['base_model']} is a local folder with no known "
            "Hub id (--base-id org/name sets it)"
        )
    if item.calibration:
        cal = item.calibration
        click.echo(
            f"  calibrated: coeff {r.coeff:g} gives p95 KL {cal['point']['kl_p95']:.3g} nat (target {cal['target_kl']:g}) "
            f"on {cal['prompts']} prompts × {cal['tokens']} tokens"
        )
    if item.gguf:
        click.echo(f"wrote {item.gguf.path}  (GGUF {outtype}, llama.cpp's convert_hf_to_gguf.py)")
    if item.verification:
        click.echo(f"verified {r.path}: passed, worst tensor at {worst_ratio(item.verification):.3g}× its tolerance")
    if item.url:
        click.echo(f"pushed {r.path} to {item.url}")


def _output_from_push(push_to: str | None) -> str:
    """Without -o, a push writes the checkpoint to a folder named after the repo (user/model-honest → ./model-honest)."""
    if push_to is None:
        raise click.UsageError("Missing option '-o' / '--output' (or give --push REPO to write ./<repo name>).")
    return push_to.rstrip("/").rpartition("/")[2]


def _push_targets(
    push_to: str | None, coeffs: tuple[float | None, ...], *, private: bool, revision: str | None, create_pr: bool
) -> dict[float | None, str]:
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
    from .card import record_verification
    from .outputs import PROVENANCE_NAME
    from .verify import verify

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
    if report.ok and (Path(merged) / PROVENANCE_NAME).is_file():
        try:
            record_verification(Path(merged), report.to_dict())  # the card's "Not verified yet" becomes the result
        except OSError as e:
            click.secho(f"warning: could not record the verification in {merged}'s card: {e.strerror}", fg="yellow", err=True)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    elif not quiet:
        click.echo(report.summary())
    if not report.ok:
        if not as_json:
            click.secho(f"error: {cli_wording(report.failure_message())}", fg="red", err=True)
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
    from .hub import check_push_target, push
    from .verify import verify

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
    from .llamacpp import convert_lora, convert_model

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
@click.argument("adapters", nargs=-1, required=True, metavar="ADAPTER[@COEFF]...")
@click.option("-o", "--output", required=True, help="Output folder (a PEFT LoRA adapter).")
@click.option("-c", "--coeff", type=float, help="Strength baked into the LoRA (one ADAPTER) [default: 1].")
@click.option("--base", help="Base model folder or Hub repo id [default: the adapters' base_model_name_or_path].")
@click.option("--scheme", help="How coeff is read (see `weightsteer schemes`), for every adapter [default: linear].")
@click.option("--compose", type=click.Choice(["chain", "sum"]), default="chain", show_default=True, help="Several adapters: as for merge.")
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
def export_lora_command(
    adapters, output, coeff, base, scheme, compose, rank, energy, task_id, gguf, outtype, llama_cpp, overwrite, quiet, as_json
) -> None:
    """Write ADAPTER at COEFF as a plain PEFT LoRA, for runtimes that steer with LoRAs (vLLM, llama.cpp).

    Low-rank changes (LoRA, rsLoRA, DeLoRA, VeRA, AdaLoRA, LoHa, ...) are factored exactly; others (IA3, RoAd,
    OFT, DoRA with its magnitude, ...) by a truncated SVD whose relative error is reported per module. Several
    adapters (ADAPTER@COEFF) give one LoRA of their composition: exact factors concatenated where every term is
    low-rank (rank Σ rᵢ), an SVD of the composed change otherwise. Every
    module gets the same rank and scale 1 (lora_alpha = r). Where the change is linear in coeff (the linear
    scheme of LoRA, DeLoRA, VeRA, IA3, ...), a runtime LoRA scale s acts as coeff s·COEFF, negative too.

    \b
    Examples:
      weightsteer export-lora ./honest-adapter -o ./honest-lora
      weightsteer export-lora ./honest-dora -o ./honest-lora --coeff -1 --energy 0.999
      weightsteer export-lora ./honest-ia3 -o ./honest-lora --rank 32 --gguf --base ./base-model
      weightsteer export-lora ./honest@0.5 ./formal@-0.3 -o ./honest-formal-lora
      vllm serve ./base-model --enable-lora --lora-modules honest=./honest-lora
      llama-cli -m base.gguf --lora-scaled honest-lora-f32.gguf:-1 -p "..."
    """
    from .export import export_lora
    from .llamacpp import check_converter, convert_lora
    from .merge import Steer

    terms = [_term(a) for a in adapters]
    if len(terms) > 1 or terms[0][1] is not None:
        if coeff is not None:
            raise click.UsageError("--coeff goes with a single ADAPTER; give each adapter its coeff as ADAPTER@COEFF.")
        adapter = [Steer(ref, 1.0 if c is None else c) for ref, c in terms]
    else:
        adapter = terms[0][0]
    if gguf:
        check_converter(llama_cpp)
    result = export_lora(
        adapter,
        output,
        coeff=1.0 if coeff is None else coeff,
        base=base,
        scheme=scheme,
        compose=compose,
        rank=rank,
        energy=energy,
        task_id=task_id,
        overwrite=overwrite,
        progress=not (quiet or as_json),
    )
    for warning in result.warnings:
        click.secho(f"warning: {cli_wording(warning)}", fg="yellow", err=True)
    converted = None
    if gguf:
        converted = convert_lora(output, result.base, outtype=outtype, llama_cpp=llama_cpp, overwrite=overwrite)
    if as_json:
        click.echo(json.dumps(result.to_dict() | {"gguf": converted.to_dict() if converted else None}, indent=2))
    elif not quiet:
        click.echo(result.summary())
        if converted:
            click.echo(f"wrote {converted.path}  (GGUF LoRA, {outtype})")


@main.command("export-vector")
@click.argument("vector")
@click.option("-o", "--output", required=True, help="GGUF file to write (a llama.cpp control vector).")
@click.option("-c", "--coeff", type=float, default=1.0, show_default=True, help="Strength folded into the directions.")
@click.option("--base", help="Base model folder or Hub repo id: check the vector's width and block indices against it.")
@click.option("--overwrite", is_flag=True, help="Replace an existing file.")
@click.option("-q", "--quiet", is_flag=True, help="No summary.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report on stdout.")
@_fail_cleanly
def export_vector_command(vector, output, coeff, base, overwrite, quiet, as_json) -> None:
    """Write the steering VECTOR at COEFF as a llama.cpp control-vector GGUF (direction.N = COEFF·v after block N).

    VECTOR is a control-vector GGUF or a steering-lite .safetensors vector. For architectures where a vector cannot
    be baked into the weights (Gemma 2/3, Qwen2/3, Mistral, MoE, ...), this is how to run it in llama.cpp.

    \b
    Examples:
      weightsteer export-vector honesty.safetensors -o honesty.gguf --coeff 4 --base ./Qwen2.5-0.5B
      llama-cli -m base.gguf --control-vector honesty.gguf -p "..."
      llama-cli -m base.gguf --control-vector-scaled honesty.gguf -0.5 -p "..."
    """
    from .formats.control_vector import export_vector

    result = export_vector(vector, output, coeff=coeff, base=base, overwrite=overwrite)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    elif not quiet:
        click.echo(result.summary())


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
    from .inspect import format_report, inspect

    report = inspect(adapter, base)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else format_report(report))


@main.command()
def schemes() -> None:
    """List every adapter type's coeff schemes as a Markdown table."""
    click.echo(_scheme_table())


def _scheme_table() -> str:
    """The scheme table, cached on disk per installed version of weightsteer's sources and plugins: building
    it imports every family module and torch (seconds), the cached text answers at once."""
    import hashlib
    import os
    from importlib.metadata import entry_points

    from .registry import ENTRY_POINT_GROUP

    package = Path(__file__).parent
    key = [__version__] + [f"{e.name}={e.value}@{e.dist.version if e.dist else ''}" for e in entry_points(group=ENTRY_POINT_GROUP)]
    key += [f"{f.relative_to(package)}:{f.stat().st_mtime_ns}:{f.stat().st_size}" for f in sorted(package.rglob("*.py"))]
    cache_root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "weightsteer"
    cached = cache_root / f"schemes-{hashlib.sha256(chr(10).join(key).encode()).hexdigest()[:16]}.md"
    if cached.is_file():
        return cached.read_text()
    from .adapters import scheme_table

    table = scheme_table()
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(table)
        partial.replace(cached)
    except OSError:
        pass  # a read-only home: no cache, same answer
    return table

"""The `weightsteer` command line."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from . import __version__
from .adapters import scheme_table
from .errors import WeightsteerError
from .inspect import format_report, inspect
from .merge import merge_many


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


def output_paths(output: str, coeffs: tuple[float, ...]) -> dict[float, Path]:
    """One folder per coeff: OUTPUT as is for one coeff; OUTPUT-c<coeff> (or a {coeff} placeholder) for several."""
    if len(set(coeffs)) != len(coeffs):
        raise click.BadParameter("each --coeff may be given once", param_hint="--coeff")
    if "{coeff}" in output:
        return {c: Path(output.format(coeff=f"{c:g}")) for c in coeffs}
    if len(coeffs) == 1:
        return {coeffs[0]: Path(output)}
    return {c: Path(f"{output}-c{c:g}") for c in coeffs}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="weightsteer")
def main() -> None:
    """Bake steering adapters (LoRA, DeLoRA, VeRA, IA3, RoAd, ...) into a model's weights at any coeff."""


@main.command()
@click.argument("adapter")
@click.option("-o", "--output", required=True, help="Output folder. With several --coeff: OUTPUT-c<coeff>, or use {coeff} in it.")
@click.option("-c", "--coeff", "coeffs", type=float, multiple=True, default=(1.0,), show_default=True, help="Strength; repeat for several checkpoints from one read of the base.")
@click.option("--base", help="Base model folder or Hub repo id [default: the adapter's base_model_name_or_path].")
@click.option("--scheme", help="How coeff is read (see `weightsteer schemes`) [default: linear].")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), help="Output dtype [default: the base's].")
@click.option("--device", default="cpu", show_default=True, help="Where the math runs, e.g. cuda.")
@click.option("--task-id", type=int, help="Poly adapters: the task whose skill mix is baked in.")
@click.option("--overwrite", is_flag=True, help="Replace existing output folders.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar, no summary.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report on stdout.")
@_fail_cleanly
def merge(adapter, output, coeffs, base, scheme, dtype, device, task_id, overwrite, quiet, as_json) -> None:
    """Merge ADAPTER (folder or Hub repo id) into its base model and write standalone checkpoints.

    \b
    Examples:
      weightsteer merge ./honest-adapter --coeff 0.5 -o ./model-honest
      weightsteer merge ./honest-adapter --coeff -1 --coeff 1 -o ./model-honest
      weightsteer merge user/ia3-adapter --scheme power --coeff -1 -o ./inverse --base ./base-model
    """
    results = merge_many(
        adapter,
        output_paths(output, coeffs),
        base=base,
        scheme=scheme,
        dtype=dtype,
        device=device,
        overwrite=overwrite,
        progress=not (quiet or as_json),
        task_id=task_id,
    )
    for result in results:
        for warning in result.warnings:
            click.secho(f"warning: {warning}", fg="yellow", err=True)
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in results], indent=2))
    elif not quiet:
        for r in results:
            click.echo(
                f"wrote {r.path}  (coeff {r.coeff:g}, scheme {r.scheme}, {len(r.changed_tensors)} tensors changed; "
                f"{r.rounding.swallowed_share:.1%} of changed elements lost to rounding)"
            )


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

"""The ``polymodal`` command line. Every command mirrors a Python API call."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from polymodal.registry import get_registry, plugin_records
from polymodal.registry.table import Entry

if TYPE_CHECKING:
    from polymodal.generation.options import SampleOption


class _Group(click.Group):
    """The built-in commands, then one group per plugin with the commands it registered (kind ``command``):
    ``polymodal flamingo caption``. A registered command's old top-level name (``polymodal caption``)
    still works for one release, hidden, with a one-line deprecation note on stderr."""

    def _commands(self) -> list[Entry]:
        """The registered commands; the loader checks their type, and an object put in the registry
        directly that is not a click command is skipped, so it cannot break ``polymodal --help``."""
        try:
            return [e for e in get_registry().entries("command") if isinstance(e.obj, click.Command)]
        except Exception:
            return []

    def _families(self) -> dict[str, click.Group]:
        """One click group per plugin that registered commands, each command under its own name."""
        commands: dict[str, dict[str, click.Command]] = {}
        for e in self._commands():
            commands.setdefault(e.plugin, {})[e.obj.name or e.name] = e.obj
        return {
            family: click.Group(
                family, commands=cmds, help=f"The {family} plugin's commands: {', '.join(sorted(cmds))}."
            )
            for family, cmds in commands.items()
        }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self._families()))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        command = super().get_command(ctx, name) or self._families().get(name)
        if command is not None:
            return command
        for e in self._commands():  # the deprecated top-level name: the name it was registered under
            if e.name == name:
                if not ctx.resilient_parsing:
                    click.echo(
                        f"`polymodal {name}` is deprecated and goes in the next release; use "
                        f"`polymodal {e.plugin} {e.obj.name or e.name}`",
                        err=True,
                    )
                return e.obj
        return None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="polymodal")
def main() -> None:
    """polymodal: multimodal transformer families from one small core."""


def _fail(exc: Exception) -> None:
    raise click.ClickException(str(exc)) from exc


@main.command()
def plugins() -> None:
    """List plugins: loaded, failed (with the error) or disabled."""
    for r in plugin_records():
        line = f"{r.name:<14} {r.status:<9} {r.source}"
        if r.status == "loaded":
            line += f"  ({r.registered} components)"
        click.echo(line)
        if r.error:
            click.echo(f"{'':<14} error: {r.error}")


@main.command("list")
@click.argument("kind", required=False)
def list_(kind: str | None) -> None:
    """List registered components, all kinds or one KIND (model, encoder, dataset …)."""
    registry = get_registry()
    try:
        entries = list(registry.entries(kind))
    except KeyError as exc:
        _fail(exc)
    for e in entries:
        click.echo(f"{e.kind:<18} {e.name:<20} {e.plugin:<10} {e.doc}")


@main.command()
@click.argument("name")
def info(name: str) -> None:
    """Show one component: its doc and, for configurable ones, every config field."""
    from polymodal.config import describe

    registry = get_registry()
    found = registry.find(name)
    if not found:
        try:
            registry.entry("model", name)
        except KeyError as exc:
            _fail(exc)
    for e in found:
        click.echo(f"{e.kind} {e.name} (plugin {e.plugin}): {e.doc}")
        target = getattr(e.obj, "config", None) if e.kind == "model" else getattr(e.obj, "config_class", None)
        if target is not None:
            for field_name, tp, default, doc in _rows(describe, target):
                click.echo(f"  {field_name:<28} {tp:<18} = {default!r:<14} {doc}")
        if e.kind == "model":
            click.echo(f"  default data: {e.obj.data}")
            for field_name, tp, default, doc in describe(e.obj.train):
                click.echo(f"  train.{field_name:<22} {tp:<18} = {default!r:<14} {doc}")


def _rows(describe, target, prefix: str = ""):
    import attrs

    for field_name, tp, default, doc in describe(target):
        if attrs.has(type(default)):
            yield from _rows(describe, default, prefix + field_name + ".")
        else:
            yield prefix + field_name, tp, default, doc


@main.command()
@click.argument("model")
@click.option("--data", help="Dataset name or a folder with captions.jsonl (default: the model's).")
@click.option(
    "--set", "set_", multiple=True, metavar="KEY=VALUE", help="Override a model config field (dotted for nested)."
)
@click.option("--train-set", multiple=True, metavar="KEY=VALUE", help="Override a training field (lr, batch_size …).")
@click.option("--steps", type=int, help="Optimiser steps.")
@click.option("--epochs", type=float, help="Epochs over the training split (instead of --steps).")
@click.option("--seed", type=int, help="Random seed.")
@click.option("--out", type=click.Path(file_okay=False), help="Model folder to write (default: runs/MODEL).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or mps.")
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint (with the same settings).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it already holds a model folder (never other files).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def train(model, data, set_, train_set, steps, epochs, seed, out, device, resume, overwrite, no_progress) -> None:
    """Train MODEL, print its test metrics and write a model folder.

    OUT must be new, empty, or (with --overwrite or --resume) a model folder; it is checked and
    locked against a second writer before the first step. The weights are saved before evaluation.
    """
    from polymodal.api import train_model

    if steps is not None and epochs is not None:
        raise click.UsageError("give --steps or --epochs, not both")
    out = out or str(Path("runs") / model)
    try:
        _, metrics = train_model(
            model,
            data=data,
            set_=set_,
            train_set=train_set,
            steps=steps,
            epochs=epochs,
            seed=seed,
            out=out,
            device=device,
            resume=resume,
            progress=not no_progress,
            overwrite=overwrite,
        )
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        _fail(exc)
    for k, v in metrics.items():
        click.echo(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    click.echo(f"saved model folder: {out}")


@main.command("eval")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--data", help="Dataset name or folder (default: the family's).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or mps.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_(directory, data, device, as_json) -> None:
    """Evaluate a model folder and print the family's metrics."""
    from polymodal.api import evaluate_folder
    from polymodal.io.output import resolve_device

    try:
        resolve_device(device)  # before loading anything: no AssertionError from deep inside torch
        metrics = evaluate_folder(directory, data=data, device=device)
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps(metrics, sort_keys=True))
    else:
        for k, v in metrics.items():
            click.echo(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")


_OPTION_TYPES = {
    "float": float,
    "int": int,
    "text": str,
    "file": click.Path(exists=True, dir_okay=False),
    "folder": click.Path(exists=True, file_okay=False),
}


@functools.cache
def _click_option(option: SampleOption) -> click.Option:
    """The click option for one declared sampling option (one object per declaration)."""
    if option.type == "switch":
        return click.Option([option.flag, option.keyword], is_flag=True, default=False, help=option.help)
    return click.Option([option.flag, option.keyword], type=_OPTION_TYPES[option.type], help=option.help)


def _all_sample_options() -> list[SampleOption]:
    """Every family's declared sampling options, one per flag (the first declaration of a flag wins)."""
    from polymodal.generation.options import sample_options

    try:
        classes = dict.fromkeys(e.obj.model_class for e in get_registry().entries("model"))
    except Exception:
        return []
    seen: dict[str, SampleOption] = {}
    keywords: set[str] = set()
    for cls in classes:
        for option in sample_options(cls):
            if option.flag not in seen and option.keyword not in keywords:
                seen[option.flag] = option
                keywords.add(option.keyword)
    return sorted(seen.values(), key=lambda o: o.flag)


class _SampleCommand(click.Command):
    """``polymodal sample``: its own options, then those DIR's family declares (``sample_options``).

    DIR is found by a first parse that knows every family's options; the real parse then knows
    only the family's, so ``--help`` lists them and another family's option is refused by name.
    """

    _FAMILY = "polymodal.sample.family"

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        family = ctx.meta.get(self._FAMILY)
        extra = _all_sample_options() if family is None else family[1]
        params = [*self.params, *(_click_option(o) for o in extra)]
        help_option = self.get_help_option(ctx)
        return params + [help_option] if help_option is not None else params

    def _family(self, ctx: click.Context, args: list[str]) -> tuple[str, tuple[SampleOption, ...]] | None:
        """The family of the model folder among ``args`` and its declared options, or None."""
        from polymodal.generation.options import sample_options
        from polymodal.io.folders import model_class_for

        try:
            opts, _, _ = self.make_parser(ctx).parse_args(args=list(args))
            header = json.loads((Path(opts["directory"]) / "config.json").read_text())
            cls = model_class_for(header["family"])
        except Exception:  # not a model folder (yet): the real parse and load report it
            return None
        return header["family"], sample_options(cls)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        family = self._family(ctx, args)
        ctx.meta[self._FAMILY] = family
        try:
            return super().parse_args(ctx, args)
        except click.NoSuchOption as exc:
            known = {o.flag: o for o in _all_sample_options()}
            if family is None or exc.option_name not in known:
                raise
            name, declared = family
            offered = ", ".join(o.flag for o in declared) or "none"
            raise click.UsageError(
                f"the {name!r} family does not support {exc.option_name} "
                f"({known[exc.option_name].keyword}); its sampling options: {offered}",
                ctx,
            ) from None


MAX_SAMPLES = 1024
"""The most samples one ``polymodal sample`` draws: families draw them in one batch, so -n sizes memory."""


@main.command(cls=_SampleCommand)
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option(
    "-n",
    "num",
    type=click.IntRange(1, MAX_SAMPLES),
    default=8,
    show_default=True,
    help=f"Number of samples (1 … {MAX_SAMPLES}: each family draws them in one batch).",
)
@click.option("--prompt", help="Text prompt, for conditional families.")
@click.option("--seed", default=0, show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default="samples", show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or mps.")
def sample(directory, num, prompt, seed, out, device, **family_options) -> None:
    """Sample from a generative model folder; writes PNGs (and a grid) to OUT.

    The options after the common ones are those DIR's family declares
    (`polymodal sample DIR --help` lists them); options left unset are not passed, so each
    family uses its own defaults. Bad values, the device and the folder are checked before sampling.
    """
    from polymodal.api import load
    from polymodal.generation.options import check_sample_values, sample_options
    from polymodal.io.output import resolve_device

    try:
        check_sample_values(family_options, _all_sample_options())
        model = load(directory, device=str(resolve_device(device)))
    except (ValueError, KeyError, RuntimeError, OSError) as exc:  # LoadError is a ValueError
        _fail(exc)
    if not hasattr(model, "sample_to_folder"):
        _fail(ValueError(f"the {model.family!r} family does not generate samples"))
    options = {}
    for option in sample_options(type(model)):
        value = family_options.get(option.keyword)
        if option.type == "switch" and value:
            options[option.keyword] = option.value
        elif option.type != "switch" and value is not None:
            options[option.keyword] = value
    try:
        paths = model.sample_to_folder(out, n=num, prompt=prompt, seed=seed, **options)
    except (ValueError, TypeError, KeyError, RuntimeError) as exc:
        _fail(exc)
    for p in paths:
        click.echo(str(p))


@main.command()
@click.option("--from", "source", required=True, help="Converter name (see `polymodal list converter`).")
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@click.argument("dst", type=click.Path(file_okay=False))
@click.option("--overwrite", is_flag=True, help="Replace DST if it already holds a model folder (never other files).")
def convert(source, src, dst, overwrite) -> None:
    """Convert a checkpoint folder SRC (e.g. Hugging Face) into a polymodal model folder DST.

    DST must be new, empty, or (with --overwrite) a model folder; it is locked while it is written.
    """
    from polymodal.io.output import output_folder

    try:
        converter = get_registry().get("converter", source)
        with output_folder(dst, overwrite=overwrite, flag="DST"):
            converter(src, dst)
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        _fail(exc)
    click.echo(f"wrote {dst}")


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True}, add_help_option=False)
@click.argument("suite", type=click.Choice(["attention", "models", "compare", "table"]))
@click.pass_context
def bench(ctx, suite) -> None:
    """Run a benchmark suite (attention, models), compare two reports, or print one as Markdown (table).

    Extra arguments go to the suite (try `bench attention --help`); `--compare BASELINE.json`
    flags regressions (> 5 % and > 30 µs slower).
    """
    sys.path.insert(0, str(_benchmarks_dir()))
    import bench as bench_module  # benchmarks/bench.py: the suites live outside the package

    sys.exit(bench_module.main([suite, *ctx.args]))


def _benchmarks_dir() -> Path:
    """The source tree's ``benchmarks/`` folder (or ``$POLYMODAL_BENCHMARKS``), where the suites live."""
    env = os.environ.get("POLYMODAL_BENCHMARKS")
    candidates = [Path(env)] if env else [Path(__file__).resolve().parent.parent / "benchmarks"]
    for folder in candidates:
        if (folder / "bench.py").is_file():
            return folder
    raise click.ClickException(
        f"the benchmark suites ship with the source tree, not the installed package: expected bench.py in "
        f"{candidates[0]}; clone the repository (or set POLYMODAL_BENCHMARKS to its benchmarks/ folder)"
    )


if __name__ == "__main__":  # pragma: no cover
    main()

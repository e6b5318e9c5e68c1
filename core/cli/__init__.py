"""The ``polymodal`` command line. Every command mirrors a Python API call.

This module holds the group, the shared options and the model commands; ``polymodal sample`` lives in
:mod:`polymodal.cli.sample`, ``polymodal data`` and ``polymodal cache`` in :mod:`polymodal.cli.store`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from polymodal.models.inference import inference_options
from polymodal.registry import get_registry, plugin_records
from polymodal.registry.table import Entry

COMPUTING = frozenset({"train", "eval", "sample", "convert", "export"})
"""The built-in commands that compute (and so take ``--threads``); every plugin command does too."""


def _set_threads(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    """``--threads N`` (or ``POLYMODAL_THREADS``): torch's intra-op CPU threads, set before the command runs."""
    if value is not None:
        import torch

        torch.set_num_threads(value)
    return value


THREADS = click.Option(
    ["--threads"],
    type=click.IntRange(min=1),
    metavar="N",
    envvar="POLYMODAL_THREADS",
    show_envvar=True,
    expose_value=False,
    is_eager=True,
    callback=_set_threads,
    help="CPU threads torch may use (default: torch's choice, one per core). On a busy or small machine "
    "--threads 1 is often several times faster.",
)
"""The one ``--threads`` option, added by :class:`_Group` to every command that computes."""


def with_threads(command: click.Command) -> click.Command:
    """``command`` with the ``--threads`` option (:data:`THREADS`) added once; a command that already
    has a ``--threads`` option of its own keeps it."""
    if not any(p is THREADS or p.name == "threads" or "--threads" in getattr(p, "opts", ()) for p in command.params):
        command.params.append(THREADS)
    return command


class _FullHelp(click.Group):
    """A group whose command list shows each command's whole first paragraph (wrapped), not a cut sentence."""

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The ``Commands:`` section: a command's ``short_help``, else its help's first paragraph."""
        rows = []
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                text = command.short_help or (command.help or "").partition("\n\n")[0]
                rows.append((name, " ".join(text.split())))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


class _Group(_FullHelp):
    """The built-in commands, then one group per plugin with the commands it registered (kind ``command``):
    ``polymodal flamingo caption``. A registered command's old top-level name (``polymodal caption``)
    still works for one release, hidden, with a one-line deprecation note on stderr. Every command that
    computes (:data:`COMPUTING` and the plugins' commands) gets ``--threads`` (:func:`with_threads`)."""

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
            family: _FullHelp(
                family,
                commands={name: with_threads(cmd) for name, cmd in cmds.items()},
                help=f"The {family} plugin's commands: {', '.join(sorted(cmds))}.",
            )
            for family, cmds in commands.items()
        }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self._families()))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        command = super().get_command(ctx, name)
        if command is not None:
            return with_threads(command) if name in COMPUTING else command
        command = self._families().get(name)
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
                return with_threads(e.obj)
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
            line += f"  ({r.registered} component{'' if r.registered == 1 else 's'})"
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
@click.option(
    "--resume",
    is_flag=True,
    help="Continue from OUT/checkpoint (with the same settings); a folder trained with --no-checkpoint has none.",
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it already holds a model folder (never other files).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option(
    "--no-checkpoint",
    is_flag=True,
    help="Leave no OUT/checkpoint (the optimiser state, about 3-4x the weights): smaller, but --resume cannot "
    "continue the run.",
)
@click.option(
    "--strategy",
    type=click.Choice(["ddp", "fsdp"]),
    help="With several processes: DDP (the default) or FSDP2 (parameters sharded per block). "
    "Same as --train-set strategy=...",
)
@click.option("--compile", "compile_", is_flag=True, help="Compile the loss with torch.compile.")
@click.option(
    "--eval-every", type=click.IntRange(min=1), metavar="N", help="Evaluate every N steps on rank 0 (train_log.jsonl)."
)
@click.option("--cpu-offload", is_flag=True, help="With --strategy fsdp: keep the sharded parameters on the CPU.")
@click.option("--tensorboard", is_flag=True, help="Also write TensorBoard events to OUT/tensorboard.")
@click.option(
    "--nproc",
    type=click.IntRange(min=1),
    metavar="N",
    help="Train on N processes of this machine: runs this same command under torchrun "
    "(--standalone --nproc-per-node N). On several machines, start torchrun yourself: "
    "torchrun --nnodes M --nproc-per-node N --rdzv-endpoint HOST:PORT -m polymodal train ...",
)
@click.pass_context
def train(
    click_ctx,
    model,
    data,
    set_,
    train_set,
    steps,
    epochs,
    seed,
    out,
    device,
    resume,
    overwrite,
    no_progress,
    no_checkpoint,
    strategy,
    compile_,
    eval_every,
    cpu_offload,
    tensorboard,
    nproc,
) -> None:
    """Train MODEL, print its test metrics and write a model folder.

    OUT must be new, empty, or (with --overwrite or --resume) a model folder; it is checked and
    locked against a second writer before the first step. The weights are saved before evaluation.

    Under torchrun (or with --nproc N) every process trains its share of each batch (the recipe's
    batch_size is the global batch); rank 0 alone writes OUT, logs and prints.
    """
    from polymodal.api import train_model

    if steps is not None and epochs is not None:
        raise click.UsageError("give --steps or --epochs, not both")
    out = out or str(Path("runs") / model)
    if nproc is not None:
        from polymodal.train.distributed import launch

        try:
            launch(["-m", "polymodal.cli", *_argv(click_ctx)], nproc)
        except RuntimeError as exc:
            _fail(exc)
        return
    flags = {"strategy": strategy, "compile": compile_ or None, "eval_every": eval_every}
    flags |= {"cpu_offload": cpu_offload or None, "tensorboard": tensorboard or None}
    train_set = (*train_set, *(f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None))
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
            keep_checkpoint=not no_checkpoint,
        )
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        if os.environ.get("WORLD_SIZE", "1") != "1":  # a torchrun worker: its launcher says "Error:" once
            click.echo(f"Error on rank {os.environ.get('RANK', '?')}: {exc}", err=True)
            sys.exit(1)
        _fail(exc)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 alone reports
        return
    for k, v in metrics.items():
        click.echo(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    click.echo(f"saved model folder: {out}")


def _argv(click_ctx: click.Context) -> list[str]:
    """The command line of this ``train`` call as given (minus ``--nproc``), for each torchrun worker."""
    from click.core import ParameterSource

    args = ["train", click_ctx.params["model"]]
    for p in click_ctx.command.params:
        if not isinstance(p, click.Option) or p.name == "nproc":
            continue
        if click_ctx.get_parameter_source(p.name) != ParameterSource.COMMANDLINE:
            continue
        value = click_ctx.params.get(p.name)
        if p.name == "threads":
            import torch

            value = torch.get_num_threads()
        if p.is_flag:
            args.append(p.opts[0])
        else:
            args += [x for v in (value if p.multiple else [value]) for x in (p.opts[0], str(v))]
    return args


@main.command("eval")
@click.argument("directory", nargs=-1, type=click.Path(exists=True, file_okay=False))
@click.option("--data", help="Dataset name or folder (default: the family's).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or mps.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option(
    "--generative",
    is_flag=True,
    help="The generative table over the DIRECTORY model folders (default: every model folder in --from): "
    "judge sample accuracy, fd_judge against the test split, samples/s, parameters.",
)
@click.option(
    "--from",
    "source",
    default="runs",
    show_default=True,
    type=click.Path(file_okay=False),
    help="With --generative and no DIRECTORY: the folder whose model folders (itself or one level down) to table.",
)
@click.option("--samples", "n", type=click.IntRange(min=2), default=1000, show_default=True, help="Samples per model.")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed (with --generative).")
@click.option(
    "--out", type=click.Path(dir_okay=False), help="With --generative: write the Markdown table here (+ .json)."
)
@click.option("--no-reference", is_flag=True, help="With --generative: no train-vs-test reference row per dataset.")
@inference_options
def eval_(directory, data, device, as_json, generative, source, n, seed, out, no_reference, dtype, compile_) -> None:
    """Evaluate a model folder and print the family's metrics; with --generative, table generative models.

    `polymodal eval --generative [DIR...]` lists every model folder whose family declares generative samples
    (the others are skipped with a message on stderr) and a reference row per dataset: its train split
    against its test split.
    """
    from polymodal.api import evaluate_folder
    from polymodal.io.output import resolve_device

    if generative:
        if dtype is not None or compile_:
            raise click.UsageError("--dtype and --compile apply to one model folder, not to --generative")
        _generative_table(directory, source, data, device, as_json, n, seed, out, no_reference)
        return
    if len(directory) != 1:
        raise click.UsageError(f"eval takes one DIRECTORY (or --generative for several); got {len(directory)}")
    try:
        resolve_device(device)  # before loading anything: no AssertionError from deep inside torch
        metrics = evaluate_folder(directory[0], data=data, device=device, dtype=dtype, compile=compile_)
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps(metrics, sort_keys=True))
    else:
        for k, v in metrics.items():
            click.echo(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")


def _generative_table(directory, source, data, device, as_json, n, seed, out, no_reference) -> None:
    """``polymodal eval --generative``: the table of :mod:`polymodal.eval.generative`, printed and written."""
    from polymodal.eval import generative as gen
    from polymodal.io.output import resolve_device

    try:
        resolve_device(device)
        if out:
            gen.check_table_out(out)  # before sampling: a user's file there is never replaced
        folders = list(directory) or gen.find_folders(source)
        if not folders:
            raise ValueError(f"no model folders in {source}; give DIRECTORY... or --from DIR")
        table = gen.generative_table(
            folders,
            n=n,
            seed=seed,
            data=data,
            device=device,
            reference=not no_reference,
            on_skip=lambda folder, reason: click.echo(f"skipped {folder}: {reason}", err=True),
        )
        if out:
            gen.write_table(table, out)
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        _fail(exc)
    click.echo(json.dumps(table, sort_keys=True) if as_json else gen.to_markdown(table).rstrip("\n"))


@main.command()
@click.option(
    "--from",
    "source",
    default=None,
    help="Converter name (see `polymodal list converter`); default: the one for SRC's config.json model_type.",
)
@click.argument("src")
@click.argument("dst", type=click.Path(file_okay=False))
@click.option("--overwrite", is_flag=True, help="Replace DST if it already holds a model folder (never other files).")
def convert(source, src, dst, overwrite) -> None:
    """Convert a transformers folder or hf:ORG/NAME to a model folder.

    SRC is a folder (a Hugging Face transformers `save_pretrained` folder) or a Hugging Face Hub
    repository hf:ORG/NAME[@REVISION], fetched through huggingface_hub (its cache, HF_HUB_OFFLINE and
    HF_TOKEN apply). The converter is picked from SRC's config.json model_type; --from names one
    (checked against it). DST must be new, empty, or (with --overwrite) a model folder; it is locked
    while it is written.
    """
    from polymodal.io.hub import conversion_source
    from polymodal.io.output import output_folder

    try:
        folder, name, converter = conversion_source(src, source)
        with output_folder(dst, overwrite=overwrite, flag="DST"):
            converter(folder, dst)
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        _fail(exc)
    click.echo(f"wrote {dst}" if source else f"wrote {dst} (converted with {name})")


@main.command("export")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option(
    "--to", "to", metavar="FORMAT", help="Target format: hf (a transformers folder; `polymodal list exporter`)."
)
@click.option("--weights-only", is_flag=True, help="Copy the model folder without checkpoint/ (the optimiser state).")
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace OUT if it holds an earlier export (or, with --weights-only, a model folder).",
)
def export(directory, out, to, weights_only, overwrite) -> None:
    """Export the model folder DIRECTORY to OUT: as a transformers folder (--to hf) that
    `from_pretrained` loads, or as a copy without the training checkpoint (--weights-only).

    OUT must be new or empty, or (with --overwrite) what an earlier export of the same kind wrote;
    it is locked while it is written and swapped into place when complete.
    """
    from polymodal.io.export import export_folder, export_weights_only

    if (to is None) == (not weights_only):
        raise click.UsageError("give --to FORMAT (e.g. --to hf) or --weights-only, one of them")
    try:
        if weights_only:
            export_weights_only(directory, out, overwrite=overwrite)
        else:
            export_folder(directory, out, to=to, overwrite=overwrite)
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        _fail(exc)
    click.echo(f"wrote {out}")


# The commands defined beside this module register themselves on ``main`` when imported.
from polymodal.cli import bench as _bench  # noqa: E402, F401
from polymodal.cli import sample as _sample  # noqa: E402, F401
from polymodal.cli import shards as _shards  # noqa: E402, F401
from polymodal.cli import store as _store  # noqa: E402, F401

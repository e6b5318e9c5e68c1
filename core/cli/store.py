"""``polymodal data`` (example images from the embedded datasets) and ``polymodal cache`` (list or clear
what polymodal keeps in ``$POLYMODAL_CACHE``)."""

from __future__ import annotations

from pathlib import Path

import click

from polymodal.cli import _fail, _FullHelp, main


@main.group("data", cls=_FullHelp)
def data_group() -> None:
    """Example data from the embedded datasets: `polymodal data export digits --n 5 --out examples`."""


@data_group.command("export")
@click.argument("dataset")
@click.option("-n", "--n", "num", type=click.IntRange(min=1), default=5, show_default=True, help="Number of images.")
@click.option("--split", type=click.Choice(["test", "train"]), default="test", show_default=True)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=".",
    show_default=True,
    help="Folder to write into (made if new).",
)
def data_export(dataset, num, split, out) -> None:
    """Write the first N images of DATASET (digits, shapes, a folder …) as PNGs, with a captions.jsonl.

    The files are DATASET_000.png …, captions.jsonl (path, caption, label) and, for labelled data,
    classes.txt, so OUT is also a dataset folder (`--data OUT`, with 2 or more images). An existing
    file is never overwritten: the command refuses before writing anything.
    """
    from polymodal.data import load_dataset
    from polymodal.io.examples import export_images

    try:
        loaded = load_dataset(dataset)
        paths = export_images(
            loaded, out, n=num, split=split, name=Path(dataset).name if loaded.name == "folder" else ""
        )
    except (ValueError, KeyError, OSError) as exc:
        _fail(exc)
    for p in paths:
        click.echo(str(p))


@main.group()
def cache() -> None:
    """What polymodal keeps in $POLYMODAL_CACHE (default ~/.cache/polymodal): list or clear it.

    Default parts ("auto"), the judge of generated images and Hugging Face Hub conversions are made
    there once and reused; each run says on stderr when it trains into or reuses an entry.
    """


@cache.command("list")
def cache_list() -> None:
    """List what is cached: kind, name, size and folder of each entry."""
    from polymodal.io.cache import cache_entries, cache_root, human_size

    root, entries = cache_root(), cache_entries()
    if not entries:
        click.echo(f"nothing cached in {root}")
        return
    width = max(len(e.name) for e in entries)
    for e in entries:
        click.echo(f"{e.kind:<6} {e.name:<{width}} {human_size(e.size):>9}  {e.path}")
    total = human_size(sum(e.size for e in entries))
    click.echo(f"{len(entries)} {'entry' if len(entries) == 1 else 'entries'}, {total}, in {root}")


@cache.command("clear")
@click.argument("names", nargs=-1, metavar="[NAME]...")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def cache_clear(names: tuple[str, ...], yes: bool) -> None:
    """Remove cached entries: every one, or each NAME (`polymodal cache list` shows the names; `parts`,
    `judge` or `hub` for all of a kind). Only what polymodal wrote is removed, never other files.
    Asks for confirmation unless --yes. A removed entry is made again when a run needs it."""
    from polymodal.io.cache import cache_root, human_size, remove_entry, select_entries

    try:
        entries = select_entries(names)
    except ValueError as exc:
        _fail(exc)
    if not entries:
        click.echo(f"nothing cached in {cache_root()}")
        return
    total = human_size(sum(e.size for e in entries))
    if not yes:
        for e in entries:
            click.echo(f"  {e.name} ({human_size(e.size)})")
        what = "1 entry" if len(entries) == 1 else f"{len(entries)} entries"
        click.confirm(f"Remove {what} ({total}) from {cache_root()}?", abort=True)
    for e in entries:
        try:
            remove_entry(e)
        except (ValueError, OSError) as exc:
            _fail(exc)
        click.echo(f"removed {e.name} ({human_size(e.size)})")

"""``polymodal sample``: its common options, then the sampling options DIR's family declares."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from polymodal.cli import _fail, inference_options, main
from polymodal.registry import get_registry

if TYPE_CHECKING:
    from polymodal.generation.options import SampleOption


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
    if option.type == "files":  # the flag repeated: --upscale a.png --upscale b.png
        path = click.Path(exists=True, dir_okay=False)
        return click.Option([option.flag, option.keyword], type=path, multiple=True, help=option.help)
    if option.type == "pair":  # two values after one flag: --interpolate a.png b.png
        path = click.Path(exists=True, dir_okay=False)
        return click.Option([option.flag, option.keyword], type=path, nargs=2, default=None, help=option.help)
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
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    help="Samples folder (default: samples/NAME, NAME the model folder's name). Each run replaces the files the "
    "previous run wrote there (listed in its .polymodal-samples.json), never other files; a folder holding "
    "other files and no such list is refused.",
)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or mps.")
@inference_options
def sample(directory, num, prompt, seed, out, device, dtype, compile_, **family_options) -> None:
    """Sample from a generative model folder; writes PNGs (and a grid) to OUT.

    OUT (default samples/NAME) holds this run's samples only: the files a previous run wrote there
    go, anything else stays. The options after the common ones are those DIR's family declares
    (`polymodal sample DIR --help` lists them); options left unset are not passed, so each
    family uses its own defaults. Bad values, the device and the folder are checked before sampling.
    """
    from polymodal.api import load
    from polymodal.generation.options import check_sample_values, sample_options
    from polymodal.io.output import resolve_device
    from polymodal.io.samples import previous_samples, write_samples_folder

    out = out or str(Path("samples") / Path(directory).resolve().name)
    try:
        check_sample_values(family_options, _all_sample_options())
        previous_samples(out)
        model = load(directory, device=str(resolve_device(device)), dtype=dtype, compile=compile_)
    except (ValueError, KeyError, RuntimeError, OSError) as exc:  # LoadError is a ValueError
        _fail(exc)
    if not hasattr(model, "sample_to_folder"):
        _fail(ValueError(f"the {model.family!r} family does not generate samples"))
    options = {}
    for option in sample_options(type(model)):
        value = family_options.get(option.keyword)
        if option.type == "switch" and value:
            options[option.keyword] = option.value
        elif option.type != "switch" and value is not None and value != ():  # () is an unset "files" option
            options[option.keyword] = value
    try:
        paths = write_samples_folder(
            out, lambda folder: model.sample_to_folder(folder, n=num, prompt=prompt, seed=seed, **options)
        )
    except (ValueError, TypeError, KeyError, RuntimeError, OSError) as exc:
        _fail(exc)
    for p in paths:
        click.echo(str(p))

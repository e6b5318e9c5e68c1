"""``polymodal ofa ask DIR IMAGE [INSTRUCTION] [--ground TEXT] [--out FILE]``: one model, any task by instruction."""

from __future__ import annotations

from pathlib import Path

import click
import torch

from polymodal.io.output import check_new_file
from polymodal.models.inference import inference_options


@click.command("ask")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.argument("image", type=click.Path(exists=True, dir_okay=False))
@click.argument("instruction", required=False)
@click.option("--ground", "ground", help='Find the region this text describes (OFA\'s " which region does …").')
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    help="With --ground: write the image with the box drawn to this new PNG (8× enlarged).",
)
@click.option("--beams", type=int, help="Beam size (default: the model's).")
@inference_options
def ask_command(directory, image, instruction, ground, out, beams, dtype, compile_) -> None:
    """Answer INSTRUCTION about IMAGE with the OFA model folder DIRECTORY (free text: a question, or
    " what does the image describe?"), or, with --ground, print the box of the described region."""
    import polymodal
    from polymodal.eval.images import read_image

    try:
        if (instruction is None) == (ground is None):
            raise ValueError("give an INSTRUCTION or --ground TEXT (one of them)")
        if out and ground is None:
            raise ValueError("--out writes the grounding picture; it needs --ground")
        if out:
            check_new_file(out)
        if beams is not None and beams < 1:
            raise ValueError(f"--beams must be >= 1; got {beams}")
        model = polymodal.load(directory, dtype=dtype, compile=compile_)
        if model.family != "ofa":
            raise ValueError(f"{directory} holds a {model.family!r} model, not an OFA model")
        size = model.config.image_size
        pixels = read_image(image, 3, size)[None]  # (1, 3, S, S)
        if ground is None:
            rows = model.run(pixels, [" " + instruction.strip()], beams=beams)
            click.echo(model.vocab.decode_text(rows[0]))
            return
        boxes, ok = model.ground(pixels, [ground])
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    if not ok[0]:
        raise click.ClickException(f"the model did not write four location tokens of a box for {ground!r}")
    x0, y0, x1, y1 = (round(float(v), 1) for v in boxes[0])
    click.echo(f"box (x0, y0, x1, y1) in pixels of the {size}×{size} image: {x0} {y0} {x1} {y1}")
    if out:
        draw_box(pixels[0], boxes[0], out)
        click.echo(f"wrote {out}")


def draw_box(image: torch.Tensor, box: torch.Tensor, out: str, scale: int = 8) -> None:
    """Save ``image`` (3, S, S) enlarged ``scale``× with ``box`` (pixels) outlined in white."""
    from polymodal.eval.images import save_png

    big = image.repeat_interleave(scale, 1).repeat_interleave(scale, 2).clone()  # (3, S·scale, S·scale)
    x0, y0, x1, y1 = (int(round(float(v) * scale)) for v in box)
    x1, y1 = min(x1, big.shape[2]) - 1, min(y1, big.shape[1]) - 1
    big[:, y0 : y1 + 1, [x0, x1]] = 1.0
    big[:, [y0, y1], x0 : x1 + 1] = 1.0
    save_png(big, Path(out))


__all__ = ["ask_command", "draw_box"]

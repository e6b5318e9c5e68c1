"""The ``polymodal fromage caption`` and ``polymodal fromage retrieve`` commands."""

from __future__ import annotations

from functools import partial

import click

from polymodal.models.inference import inference_options


def _load(directory: str, dtype: str | None = None, compile_: bool = False):
    """The FROMAGe model in ``directory`` (ValueError for another family), in ``dtype``, compiled with
    ``compile_`` (:func:`polymodal.load`)."""
    import polymodal

    model = polymodal.load(directory, dtype=dtype, compile=compile_)
    if model.family != "fromage":
        raise ValueError(f"{directory} holds a {model.family!r} model, not a FROMAGe model")
    return model


@click.command("caption")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--max-tokens",
    type=click.IntRange(min=1),
    help="Tokens generated at most (default: the model's max_caption_tokens; at most what the LM's context leaves).",
)
@inference_options
def caption_command(directory, images, max_tokens, dtype, compile_) -> None:
    """Caption IMAGES with the FROMAGe model folder DIRECTORY; prints one `path: caption` line each."""
    import torch

    from polymodal.eval.images import read_image

    from .infer import caption

    try:
        model = _load(directory, dtype, compile_)
        room = model.lm.max_len - model.config.prefix_tokens  # bos + the image prefix + the caption
        if max_tokens is not None and max_tokens > room:
            raise ValueError(
                f"--max-tokens must be at most {room} for this model (its LM holds {model.lm.max_len} positions: "
                f"bos, {model.config.prefix_tokens} image prefix token(s) and the caption); got {max_tokens}"
            )
        v = model.vision.config.vision
        batch = torch.stack([read_image(p, v.channels, v.image_size) for p in images])  # (N, C, S, S)
        texts = caption(model, batch, max_new_tokens=max_tokens)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    for path, text in zip(images, texts):
        click.echo(f"{path}: {text}")


@click.command("retrieve")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.argument("prompt")
@click.option(
    "--gallery",
    type=click.Path(exists=True, file_okay=False),
    help="Folder of images to retrieve from (default: the test split of the model's data).",
)
@click.option("-k", "k", default=5, show_default=True, help="Images to retrieve.")
@click.option(
    "--image",
    "inputs",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="An image for each <image> token of PROMPT, in order (repeatable).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    help="Also write the images and a transcript to this samples folder (as `polymodal sample --out`: a "
    "rerun replaces what the last run wrote, never other files).",
)
@inference_options
def retrieve_command(directory, prompt, gallery, k, inputs, out, dtype, compile_) -> None:
    """Continue PROMPT (may hold <image> tokens) with DIRECTORY's FROMAGe model; print the k nearest gallery images."""
    import torch

    from polymodal.eval.images import read_image
    from polymodal.io.samples import previous_samples, write_samples_folder

    from .infer import generate
    from .samples import load_gallery, retrieval_to_folder

    try:
        if out:
            previous_samples(out)  # a samples folder, as `polymodal sample --out`: a user's own files stay
        model = _load(directory, dtype, compile_)
        images, names = load_gallery(model, gallery)
        v = model.vision.config.vision
        given = torch.stack([read_image(p, v.channels, v.image_size) for p in inputs]) if inputs else None
        result = generate(model, prompt, images=given, gallery=images, k=k)
        if out:
            # the result printed below, written as it is (generating again would cost a second run)
            write_samples_folder(
                out, partial(retrieval_to_folder, prompt=prompt, result=result, gallery=images, names=names)
            )
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"generated: {result['text']}")
    click.echo(f"[RET]: {'emitted' if result['emitted_ret'] else 'not emitted (appended)'}")
    for j, s in zip(result["retrieved"].tolist(), result["scores"].tolist()):
        click.echo(f"  {names[j]}  cosine {s:.3f}")

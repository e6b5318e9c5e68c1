"""Captioning with in-context examples: KV-cache generation, readable transcripts, ``sample_to_folder``
and the ``polymodal flamingo caption DIR IMAGE... [--shots K]`` command."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import click
import torch
from torch import Tensor

from polymodal.generation.linear import fast_linear, fast_linears
from polymodal.generation.options import TOKEN_SAMPLING, check_sample_values, keywords
from polymodal.generation.sampling import generate
from polymodal.io.folders import atomic_write
from polymodal.io.output import check_new_file
from polymodal.models.inference import inference_options
from polymodal.nn import KVCache, eval_mode

from . import interleave as il

_SAMPLING = keywords(TOKEN_SAMPLING)


class GenerateMixin:
    """Generation for :class:`~polymodal.plugins.flamingo.model.Flamingo` (uses its ``hidden``/``logits``)."""

    sample_options = TOKEN_SAMPLING
    """The options of ``polymodal sample`` (temperature, top-k, top-p, no cache)."""

    def step_fn(self, context: Tensor, *, cross_cache: bool = True, last_only: bool = False):
        """``step(ids, cache) -> logits`` for :func:`polymodal.generation.sampling.generate` over visual tokens ``context``.

        With a cache it gets only the new ids and counts the ``<image>`` tokens already fed, so
        every new token still sees the latest image before it; the cross-attention blocks keep the
        keys and values of ``context`` in that cache (computed once per generation) unless
        ``cross_cache`` is False (then they are projected again every step: the reference path).
        ``last_only`` returns the last position's logits (B, 1, V + 2), all the sampler reads. Cached steps compute
        their linear layers through :func:`~polymodal.generation.linear.fast_linear` by the kernel the LM
        decoder's tuner finds faster on this machine (both settings of ``cross_cache`` alike).
        """
        state: dict[str, Tensor | None] = {"seen": None}
        linears = [*self.lm.decoder.inference_linears(), *self.xattn.modules()]

        def step(ids: Tensor, cache: Any) -> Tensor:
            if cache is None:
                return self.logits(self.hidden(ids, context))
            seen = state["seen"]
            tuned = (
                self.lm.decoder.tuner.step(("flamingo", ids.shape[0], cross_cache)) if cache.length else nullcontext()
            )
            with fast_linears(linears), tuned:
                h = self.hidden(ids, context, cache=cache, offset=seen, cross_cache=cross_cache)  # (B, n, D)
            new = il.image_counts(ids, self.image_id).to(context.device)  # (B,)
            state["seen"] = new if seen is None else seen + new
            return self.decode_logits(h[:, -1:] if last_only else h)  # (B, n or 1, V + 2)

        return step

    def decode_logits(self, hidden: Tensor) -> Tensor:
        """:meth:`logits` for decoding: the same tied rows through :func:`~polymodal.generation.linear.fast_linear`."""
        weight = self.lm.token_embed.weight  # (V, D)
        return torch.cat([fast_linear(hidden, weight), fast_linear(hidden, self.special.weight)], dim=-1)

    def query_text(self) -> str:
        """The evaluation template's text before the word (``"This is a"``)."""
        return self.config.eval_template.split("{word}")[0].rstrip()

    @torch.no_grad()
    def continue_text(
        self,
        text: str,
        images: Tensor,
        *,
        max_new_tokens: int = 12,
        seed: int = 0,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        use_cache: bool = True,
        cross_cache: bool = True,
    ) -> str:
        """Generate the continuation of one interleaved ``text`` over ``images`` (M, C, H, W), up to
        ``<|endofchunk|>``; greedy unless a sampling option is given.

        ``use_cache`` keeps past keys and values (False: every step reruns the whole sequence);
        ``cross_cache`` also keeps the visual context's cross-attention keys and values (computed
        once per generation; False: projected again every step, for comparison)."""
        with eval_mode(self):
            ids = torch.tensor([self.encode_text(text)], dtype=torch.long)  # (1, T)
            context, counts = self.media([images], 1)
            self.check_images(ids, counts)
            room = self.lm.max_len - ids.shape[1]
            if room < 1:
                raise ValueError(f"the prompt has {ids.shape[1]} tokens; the LM reads at most {self.lm.max_len}")
            allowed = torch.ones(self.lm.vocab_size + 2, dtype=torch.bool)
            tok = self.tokenizer.special_tokens
            allowed[[self.image_id, tok["bos"], tok["pad"]]] = False
            greedy = temperature is None and top_k is None and top_p is None
            out = generate(
                self.step_fn(context, cross_cache=cross_cache, last_only=True),
                ids.to(context.device),
                min(max_new_tokens, room),
                temperature=temperature or 1.0,
                top_k=top_k,
                top_p=top_p,
                greedy=greedy,
                generator=torch.Generator().manual_seed(seed),
                allowed=allowed.to(context.device),
                eos_id=self.eoc_id,
                use_cache=use_cache,
                new_cache=lambda positions: KVCache(capacity=positions),  # preallocated for prompt + new tokens
            )
            new = out[0, ids.shape[1] :].tolist()
            stops = [i for i, t in enumerate(new) if t in (self.eoc_id, tok["eos"])]
            end = stops[0] if stops else len(new)
        return self.tokenizer.decode(new[:end]) + (il.END_OF_CHUNK if stops and new[end] == self.eoc_id else "")

    def few_shot_text(self, labels: Sequence[int], query: str | None = None) -> str:
        """In-context chunks in the evaluation format for ``labels``, then ``<image>query``."""
        captions = [il.fill(self.config.eval_template, int(y)) for y in labels]
        return il.chunk_text(captions, self.query_text() if query is None else query)

    def caption(
        self,
        image: Tensor,
        examples: tuple[Tensor, Sequence[int]] | None = None,
        *,
        prompt: str | None = None,
        **options: Any,
    ) -> tuple[str, str]:
        """Caption one image (C, H, W) after in-context ``examples`` (images (k, C, H, W), labels);
        returns ``(prompt text, generated continuation)``."""
        ex_images, ex_labels = examples if examples is not None else (image.new_zeros((0, *image.shape)), [])
        text = self.few_shot_text(list(ex_labels), prompt)
        prep = self.vision.prepare  # examples and query may come at different sizes
        images = torch.cat([prep(ex_images.to(image.device)), prep(image[None])])  # (k + 1, C, S, S)
        return text, self.continue_text(text, images, **options)

    def generate(
        self,
        prompt: str | None = None,
        images: Any = None,
        *,
        shots: int = 0,
        max_new_tokens: int = 12,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
        use_cache: bool = True,
    ) -> str:
        """The text Flamingo generates for ``images`` (one image or a list; paths, PIL images, arrays
        or tensors, prepared by :meth:`preprocess`), up to ``<|endofchunk|>``.

        A ``prompt`` with ``<image>`` tokens is continued as it is (one image per token). Otherwise the
        one image is captioned after ``shots`` in-context examples drawn (with ``seed``) from the
        training split of ``config.data`` (``polymodal caption --shots``), the ``prompt`` (default: the
        evaluation query, "This is a") after it. Greedy unless ``temperature``/``top_k``/``top_p``.
        """
        values = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
        check_sample_values(values, ())
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if isinstance(shots, bool) or not isinstance(shots, int) or shots < 0:
            raise ValueError(f"shots must be an integer >= 0, got {shots!r}")
        if images is None:
            raise ValueError("Flamingo.generate needs images= (a path, PIL image, array or tensor, or a list of them)")
        batch = self.preprocess_images(images)  # (N, C, S, S)
        options = {**values, "max_new_tokens": max_new_tokens, "seed": seed, "use_cache": use_cache}
        if prompt is not None and il.IMAGE in prompt:
            if shots:
                raise ValueError(f"shots= goes with a prompt without {il.IMAGE}; this prompt places its own images")
            return self.continue_text(prompt, batch, **options)
        if len(batch) != 1:
            raise ValueError(
                f"a prompt without {il.IMAGE} captions one image; got {len(batch)} (put {il.IMAGE} in the prompt)"
            )
        examples = None
        if shots:
            from polymodal.data import load_dataset

            examples = self.draw_examples(load_dataset(self.config.data), shots, torch.Generator().manual_seed(seed))
        return self.caption(batch[0], examples, prompt=prompt, **options)[1]

    def draw_examples(self, dataset: Any, k: int, generator: torch.Generator) -> tuple[Tensor, list[int]]:
        """``k`` random training images and their labels."""
        idx = torch.randperm(len(dataset.train), generator=generator)[:k]
        return dataset.train["image"][idx], dataset.train["label"][idx].tolist()

    def sample_to_folder(
        self, out: str | Path, *, n: int = 8, prompt: str | None = None, seed: int = 0, **options: Any
    ) -> list[Path]:
        """Caption ``n`` random test images after ``sample_shots`` in-context examples each; writes the
        query images (``sample_000.png`` …, ``grid.png``), the examples (``examples/``) and
        ``transcript.txt``. Options: temperature, top_k, top_p, use_cache."""
        from polymodal.data import load_dataset
        from polymodal.eval.images import save_png, write_samples

        bad = sorted(set(options) - set(_SAMPLING))
        if bad:
            raise ValueError(f"the flamingo family supports only {', '.join(_SAMPLING)}; got {', '.join(bad)}")
        if n < 1:
            raise ValueError(f"n must be >= 1; got {n}")
        dataset = load_dataset(self.config.data)
        g = torch.Generator().manual_seed(seed)
        test = dataset.split("test")
        pick = torch.randperm(len(test), generator=g)[:n]
        out = Path(out)
        paths = write_samples(test["image"][pick], out)
        lines = [
            f"Flamingo captions ({self.config.sample_shots}-shot, prompt {prompt or self.query_text()!r}); "
            "[image: FILE] marks where each image sits in the text; the generated text follows '⟶'.",
            "",
        ]
        for i, j in enumerate(pick.tolist()):
            ex_images, ex_labels = self.draw_examples(dataset, self.config.sample_shots, g)
            ex_paths = [
                save_png(img, out / "examples" / f"sample_{i:03d}_example_{e}.png") for e, img in enumerate(ex_images)
            ]
            paths += ex_paths
            text, gen = self.caption(test["image"][j], (ex_images, ex_labels), prompt=prompt, seed=seed + i, **options)
            names = [str(p.relative_to(out)) for p in ex_paths] + [f"sample_{i:03d}.png"]
            lines += [
                f"## sample {i} (test image {j}, digit {int(test['label'][j])})",
                transcript(text, names, gen),
                "",
            ]
        path = atomic_write(out / "transcript.txt", "\n".join(lines))
        return paths + [path]


def transcript(text: str, image_names: Sequence[str], generated: str) -> str:
    """The interleaved prompt with each ``<image>`` shown as ``[image: name]``, one chunk per line,
    then ``⟶`` and the generated text."""
    pieces = text.split(il.IMAGE)
    out = pieces[0]
    for name, piece in zip(image_names, pieces[1:]):
        out += f"[image: {name}] {piece}"
    return out.replace(il.END_OF_CHUNK, il.END_OF_CHUNK + "\n") + f" ⟶{generated}"


@click.command("caption")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--shots", default=2, show_default=True, help="In-context (image, caption) examples from the digits train split."
)
@click.option("--prompt", help="Text after each image (default: the model's 'This is a').")
@click.option("--seed", default=0, show_default=True, help="Seed drawing the examples (and sampling).")
@click.option("--temperature", type=float, help="Sample with this temperature instead of greedy decoding.")
@click.option("--out", "out", type=click.Path(dir_okay=False), help="Also write the transcript to this text file.")
@inference_options
def caption_command(directory, images, shots, prompt, seed, temperature, out, dtype, compile_) -> None:
    """Caption IMAGES with the Flamingo model folder DIRECTORY after SHOTS in-context examples; prints a transcript."""
    import polymodal
    from polymodal.data import load_dataset
    from polymodal.eval.images import read_image

    try:
        if out:
            check_new_file(out)
        model = polymodal.load(directory, dtype=dtype, compile=compile_)
        if model.family != "flamingo":
            raise ValueError(f"{directory} holds a {model.family!r} model, not a Flamingo model")
        if shots < 0:
            raise ValueError(f"--shots must be >= 0; got {shots}")
        v = model.vision.config.vision
        dataset = load_dataset(model.config.data) if shots else None
        g = torch.Generator().manual_seed(seed)
        blocks = []
        for i, path in enumerate(images):
            image = read_image(path, v.channels, v.image_size)  # (C, S, S)
            ex = model.draw_examples(dataset, shots, g) if shots else None
            text, gen = model.caption(image, ex, prompt=prompt, seed=seed + i, temperature=temperature)
            names = [f"train example, digit {y}" for y in (ex[1] if ex else [])] + [str(path)]
            blocks.append(transcript(text, names, gen))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    report = "\n\n".join(blocks)
    click.echo(report)
    if out:
        atomic_write(out, report + "\n")  # checked before any work: never replaces a file it did not write


__all__ = ["GenerateMixin", "caption_command", "transcript"]

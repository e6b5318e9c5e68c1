"""RuDolph's tasks on a trained model: text→image, captioning, zero-shot classification, self-reranking.

All sampling goes through the core decoder (:attr:`RuDolph.decoder`: the core sampler over a preallocated KV
cache, with compiled steps under the model's ``compile_inference``) and ``allowed=`` restricting each position
to its own part of the vocabulary (image codes in the image, text ids in the right context); a non-finite
logit raises instead of drawing garbage.

* **text→image**: left ``[lt_t2i] prompt [eos] pad…`` → 16 image codes (no prompt: the image→text layout's
  ``[lt_i2t] pad…`` left context, i.e. unconditional images);
* **captioning**: ``[lt_i2t] pad…`` + the image codes + ``[rt_i2t]`` → right text, greedy by default;
* **zero-shot classification**: the class whose caption has the lowest right-text perplexity given the image
  (:meth:`RudolphTasks.caption_nll`; the image prefix is run once and its KV cache copied for every caption);
* **self-reranking**: of ``candidates`` images drawn per sample, keep the one under which the prompt, read as a
  right-text caption, has the lowest perplexity.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from polymodal.generation.options import TOKEN_SAMPLING
from polymodal.nn import KVCache, eval_mode

from . import text as tx
from .collate import dataset_images
from .config import CANDIDATES, SAMPLE_OPTIONS


class RudolphTasks:
    """Mixin of :class:`~polymodal.plugins.rudolph.model.RuDolph` with its generation and scoring tasks."""

    sample_options = (*TOKEN_SAMPLING, CANDIDATES)
    """The options of ``polymodal sample``: the token-sampling options and self-reranking ``--candidates``."""

    def _step(self, ids: Tensor, cache: KVCache | None) -> Tensor:
        """The sampler's step function: logits (B, n, V) for the new ids (the whole stream without cache), through
        the core decoder (its compiled static step when the model's ``compile_inference`` is on)."""
        return self.decoder.step_fn()(ids, cache)

    def _device(self) -> torch.device:
        return self.layer_masks.device

    # -- text → image ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_codes(
        self,
        prompts: Sequence[str | None],
        *,
        generator: torch.Generator | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        use_cache: bool = True,
    ) -> Tensor:
        """Image codes (B, h, w), one per prompt (None or '': unconditional); config defaults fill unset options."""
        c = self.config
        with eval_mode(self):
            t2i = self.left_text([p or "" for p in prompts], "lt_t2i")  # (B, L)
            uncond = self.left_text([""] * len(prompts), "lt_i2t")  # (B, L)
            has = torch.tensor([bool(p) for p in prompts], device=t2i.device)[:, None]  # (B, 1)
            left = torch.where(has, t2i, uncond)  # (B, L)
            ids = self.decoder.generate(
                left,
                self.image_len,
                temperature=c.temperature if temperature is None else temperature,
                top_k=c.top_k if top_k is None else top_k,
                top_p=c.top_p if top_p is None else top_p,
                generator=generator,
                allowed=self.vocab_masks[1],
                use_cache=use_cache,
            )  # (B, L + h·w)
        return self.ids_to_codes(ids[:, c.left_len :])

    @torch.no_grad()
    def generate_images(
        self,
        prompts: Sequence[str | None],
        *,
        candidates: int = 1,
        generator: torch.Generator | None = None,
        **options: Any,
    ) -> Tensor:
        """Images (B, C, S, S) for ``prompts``; with ``candidates`` > 1 each is the self-reranked best of that many."""
        if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
            raise ValueError(f"candidates must be an integer >= 1; got {candidates!r}")
        if candidates > 1 and not all(prompts):
            raise ValueError("self-reranking scores candidates by the prompt's perplexity as a caption; give a prompt")
        many = [p for p in prompts for _ in range(candidates)]
        codes = self.generate_codes(many, generator=generator, **options)  # (B·C, h, w)
        if candidates > 1:
            codes = self.rerank(codes.view(len(prompts), candidates, *self.grid), list(prompts))  # (B, h, w)
        return self.decode_codes(codes)

    @torch.no_grad()
    def rerank(self, codes: Tensor, prompts: list[str]) -> Tensor:
        """Codes (B, C, h, w) of C candidates per prompt → (B, h, w): the candidate whose caption NLL of its prompt is lowest."""
        b, k = codes.shape[:2]
        nll = torch.stack([self.caption_nll(codes[i], [prompts[i]])[:, 0] for i in range(b)])  # (B, C)
        return codes[torch.arange(b), nll.argmin(1)]

    # -- image → text ------------------------------------------------------------------------------
    @torch.no_grad()
    def caption_codes(
        self,
        codes: Tensor,
        *,
        greedy: bool = True,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
        use_cache: bool = True,
    ) -> list[str]:
        """A caption per image given as codes (B, h, w), generated in the right context (greedy by default)."""
        c, sp = self.config, self.text.special_tokens
        with eval_mode(self):
            b = codes.shape[0] if isinstance(codes, Tensor) and codes.dim() else 0
            prefix = torch.cat(
                [
                    self.left_text([""] * b, "lt_i2t"),
                    self.codes_to_ids(codes),
                    self.right_text([""] * b, "rt_i2t")[:, :1],
                ],
                dim=1,
            )  # (B, L + h·w + 1)
            ids = self.decoder.generate(
                prefix,
                c.right_len - 1,
                greedy=greedy,
                temperature=temperature,
                generator=generator,
                allowed=self.vocab_masks[2],
                eos_id=sp["eos"],
                pad_id=sp["pad"],
                use_cache=use_cache,
            )
        return [t.strip() for t in self.text.decode_batch(ids[:, prefix.shape[1] :])]

    @torch.no_grad()
    def caption(self, images: Tensor, **options: Any) -> list[str]:
        """A caption per image (B, C, S, S) in [0, 1]; options as :meth:`caption_codes`."""
        return self.caption_codes(self.encode_images(images), **options)

    def generate(self, prompt: str | None = None, images: Any = None, **options: Any) -> str | list[str]:
        """The text RuDolph writes after ``prompt`` about ``images`` (one: a string; several: a list):
        :func:`.captions.generate_caption` (greedy unless ``temperature``/``top_k``/``top_p``; ``max_new_tokens``, ``seed``)."""
        from .captions import generate_caption

        return generate_caption(self, prompt, images, **options)

    # -- scoring -------------------------------------------------------------------------------------
    @torch.no_grad()
    def caption_nll(self, codes: Tensor, captions: Sequence[str], chunk: int = 32) -> Tensor:
        """(B, K): mean negative log-likelihood per token (log perplexity) of each caption as right text of each image.

        The prefix ``[lt_i2t] pad… image`` runs once per image into a preallocated cache, copied (``select``) for
        the K captions, which then run together. Tokens are scored within the text vocabulary (caption tokens and
        end-of-text; the task token and padding are not scored).
        """
        with eval_mode(self):
            right = self.right_text(list(captions), "rt_i2t")  # (K, R)
            k = right.shape[0]
            tgt = self.targets(right)  # (K, R-1), pad ignored
            out = []
            for codes_part in codes.split(chunk):
                b = codes_part.shape[0]
                prefix = torch.cat([self.left_text([""] * b, "lt_i2t"), self.codes_to_ids(codes_part)], dim=1)  # (b, P)
                cache = self.decoder.new_cache()  # preallocated for the whole stream
                self(prefix, cache=cache)
                cache.select(torch.arange(b, device=prefix.device).repeat_interleave(k))  # b·K rows
                logits = self(right[:, :-1].repeat(b, 1), cache=cache)  # (b·K, R-1, V)
                logits = logits.masked_fill(~self.vocab_masks[2], float("-inf"))
                t = tgt.repeat(b, 1)  # (b·K, R-1)
                ce = F.cross_entropy(
                    logits.transpose(1, 2).float(), t, ignore_index=tx.IGNORE, reduction="none"
                )  # (b·K, R-1)
                counted = (t != tx.IGNORE).float()
                out.append(((ce * counted).sum(1) / counted.sum(1).clamp(min=1)).view(b, k))
        return torch.cat(out)  # (B, K)

    @torch.no_grad()
    def paired_caption_nll(self, codes: Tensor, captions: Sequence[str], chunk: int = 64) -> Tensor:
        """(B,): mean NLL per token of caption i as right text of image i (long captions are cut)."""
        with eval_mode(self):
            r, out = self.config.right_len - 1, []
            for start in range(0, len(captions), chunk):
                part = codes[start : start + chunk]
                t2i = torch.zeros(part.shape[0], dtype=torch.bool, device=self._device())
                ids = self.stream(list(captions[start : start + chunk]), part, t2i, truncate=True)  # (b, N)
                logits = self(ids[:, :-1])[:, -r:].masked_fill(~self.vocab_masks[2], float("-inf"))  # (b, R-1, V)
                tgt = self.targets(ids)[:, -r:]  # (b, R-1)
                ce = F.cross_entropy(logits.transpose(1, 2).float(), tgt, ignore_index=tx.IGNORE, reduction="none")
                counted = (tgt != tx.IGNORE).float()
                out.append((ce * counted).sum(1) / counted.sum(1).clamp(min=1))
        return torch.cat(out)

    @torch.no_grad()
    def zero_shot(self, images: Tensor, class_captions: Sequence[Sequence[str]]) -> Tensor:
        """Class (B,) of each image: the class owning the caption with the lowest right-text perplexity."""
        flat = [(i, t) for i, texts in enumerate(class_captions) for t in texts]
        if not flat:
            raise ValueError("zero_shot needs at least one caption per class; got none")
        nll = self.caption_nll(self.encode_images(images), [t for _, t in flat])  # (B, K)
        owner = torch.tensor([i for i, _ in flat], device=nll.device)
        return owner[nll.argmin(1)]

    # -- the CLI ------------------------------------------------------------------------------------
    def sample_to_folder(
        self, out: str | Path, n: int = 8, prompt: str | None = None, seed: int = 0, **options: Any
    ) -> list[Path]:
        """Write ``n`` samples for ``prompt`` as PNGs and a grid; supports temperature, top_k, top_p, use_cache, candidates."""
        from polymodal.eval.images import write_samples

        unknown = sorted(set(options) - set(SAMPLE_OPTIONS))
        if unknown:
            raise ValueError(
                f"RuDolph sampling does not support {', '.join(unknown)}; it supports {', '.join(SAMPLE_OPTIONS)}"
            )
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an integer >= 1; got {n!r}")
        candidates = options.pop("candidates", 1)
        generator = torch.Generator(device=self._device()).manual_seed(int(seed))
        images = self.generate_images([prompt] * n, candidates=candidates, generator=generator, **options)
        return write_samples(images.cpu(), out)

    # -- evaluation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def generative_samples(self, dataset: Any, n: int, seed: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        """``polymodal eval --generative``: ``n`` samples for ``eval_prompt`` cycling through the classes."""
        names = list(self.config.class_names)
        if not names or "label" not in dataset.test:
            raise ValueError(f"RuDolph's evaluation prompts need class names and labelled data; got {dataset.name!r}")
        labels = torch.arange(n) % len(names)  # (n,)
        prompts = [tx.fill(self.config.eval_prompt, k, names) for k in labels.tolist()]
        g = torch.Generator(device=self._device()).manual_seed(seed)
        images = [self.generate_images(prompts[s : s + 256], generator=g).cpu() for s in range(0, n, 256)]
        return torch.cat(images), {"label": labels}

    def dataset_images(self, images: Tensor) -> Tensor:
        """A dataset's float images (B, C, H, W) resized to the frozen tokenizer's size (a folder keeps its
        images at their own size; :meth:`encode_images` itself takes only the tokenizer's)."""
        return dataset_images(images, self.vq.config.image_size)  # (B, C, S, S)

    @torch.no_grad()
    def evaluate(self, dataset: Any, split: str = "test") -> dict[str, Any]:
        """``caption_accuracy``, ``zero_shot_accuracy``, ``sample_accuracy`` (judge), ``fd_judge`` and reranked samples.

        Captions are greedy; a caption is right when the only digit it names (word or numeral)
        is the image's. Zero-shot captions are every training template filled for every class. Samples: ``eval_samples`` per class for the prompt ``eval_prompt``,
        seeded with ``eval_seed``, judged by :func:`polymodal.eval.judge.judge_samples`. On data whose
        captions name no single class (shapes scenes, a folder) only ``caption_nll`` is reported:
        the mean NLL per token of the split's own captions as right text.
        """
        from polymodal.eval.judge import get_judge, judge_samples

        c = self.config
        data = dataset.split(split)
        codes = torch.cat([self.encode_images(self.dataset_images(x)) for x in data["image"].split(256)])  # (N, h, w)
        if not c.class_names or "label" not in data:  # captions that name no single class: perplexity only
            nll = self.paired_caption_nll(codes, list(data["caption"])) if "caption" in data else torch.zeros(1)
            return {"caption_nll": nll.mean().item(), "samples": len(codes)}
        with torch.enable_grad():  # the judge trains on first use (cached), which needs autograd
            get_judge(dataset)
        names = list(c.class_names)
        labels = data["label"].to(self._device())
        captions = [t for part in codes.split(256) for t in self.caption_codes(part)]
        named = torch.tensor([tx.caption_label(t, names) for t in captions], device=labels.device)
        metrics: dict[str, Any] = {"caption_accuracy": (named == labels).float().mean().item()}
        templates = c.templates or ("{word}",)
        flat = [(k, tx.fill(t, k, names)) for k in range(len(names)) for t in templates]
        nll = self.caption_nll(codes, [t for _, t in flat])  # (N, K·T)
        pred = torch.tensor([k for k, _ in flat], device=labels.device)[nll.argmin(1)]
        metrics["zero_shot_accuracy"] = (pred == labels).float().mean().item()
        prompts = [tx.fill(c.eval_prompt, k, names) for k in range(len(names)) for _ in range(c.eval_samples)]
        targets = torch.arange(len(names)).repeat_interleave(c.eval_samples)
        g = torch.Generator(device=self._device()).manual_seed(c.eval_seed)
        metrics.update(judge_samples(dataset, self.generate_images(prompts, generator=g).cpu(), {"label": targets}))
        if c.eval_candidates > 1:
            g = torch.Generator(device=self._device()).manual_seed(c.eval_seed)
            ranked = judge_samples(
                dataset,
                self.generate_images(prompts, candidates=c.eval_candidates, generator=g).cpu(),
                {"label": targets},
            )
            metrics.update({f"{k}_reranked": v for k, v in ranked.items() if not k.startswith("sample_label")})
        metrics["caption_examples"] = captions[:5]
        metrics["samples"] = len(labels)
        return metrics


__all__ = ["RudolphTasks", "SAMPLE_OPTIONS"]

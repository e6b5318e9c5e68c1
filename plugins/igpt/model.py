"""iGPT (Chen et al., 2020): a GPT-2 decoder over raster-order palette tokens of an image.

The token stream of an image with ``N = S·S`` pixels is ``[SOS, t_0, …, t_{N-2}]`` and the
targets are ``t_0 … t_{N-1}`` (next-token cross-entropy), exactly as transformers'
``ImageGPTForCausalImageModeling`` reads it (the start token is the last embedding row,
id ``palette_size``). iGPT's details, all from the core parts: pre-norm blocks with
bias-free RMS normalisation (a learned gain, no centring, no bias), QuickGELU MLPs, learned
position embeddings, and an untied output layer without bias, initialised to zero (so a
fresh model predicts the uniform distribution). The trunk (positions, dropout, causal stack, KV cache, head,
generation) is the core :class:`~polymodal.generation.decoder.CausalDecoder` over these modules
(``model.decoder``; it owns no weights, so the state-dict keys are unchanged).
"""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.data.augment import random_translate, resize
from polymodal.generation.decoder import CausalDecoder
from polymodal.io.cache import cache_root
from polymodal.models import PolymodalModel
from polymodal.nn import BlockConfig, KVCache, PositionEmbedding, StackConfig, TransformerStack, eval_mode, init_weights
from polymodal.objectives import cross_entropy

from . import palette as pal
from . import probe
from .config import IGPTConfig
from .sample import SamplingMixin


def probe_plot_path(folder: str | Path) -> Path:
    """Where ``evaluate`` puts the probe plot of the model loaded from ``folder``: under the cache
    (``$POLYMODAL_CACHE/igpt-probe/<folder name>-<hash of its absolute path>/probe_by_layer.png``)."""
    folder = Path(folder).resolve()
    key = hashlib.sha256(str(folder).encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", folder.name) or "model"
    return cache_root() / "igpt-probe" / f"{name}-{key}" / "probe_by_layer.png"


class IGPT(SamplingMixin, PolymodalModel):
    """Token ids (B, T) with the start token first → next-token logits (B, T, palette_size)."""

    family = "igpt"
    image_fields = "config"  # image_size and channels: what preprocess() prepares
    config_class = IGPTConfig

    def __init__(self, config: IGPTConfig) -> None:
        super().__init__(config)
        k, n, c = config.palette_size, config.image_size**2, config.channels
        self.sos = k
        self.register_buffer("palette", torch.linspace(0, 1, k).unsqueeze(1).repeat(1, c))  # (K, C) until fitted
        self.register_buffer("palette_fitted", torch.tensor(False))
        self.token_embed = nn.Embedding(k + 1, config.dim)  # row K: the learned start token
        self.pos_embed = PositionEmbedding(config.dim, (1, n), kind="learned")  # (1, N, D)
        self.drop = nn.Dropout(config.dropout)
        block = BlockConfig(
            dim=config.dim,
            heads=config.heads,
            mlp_ratio=config.mlp_ratio,
            norm="rmsnorm",
            norm_eps=config.norm_eps,
            act=config.act,
            dropout=config.dropout,
            attn_dropout=config.attn_dropout,
        )
        self.blocks = TransformerStack(StackConfig(depth=config.depth, block=block, final_norm=True))
        self.head = nn.Linear(config.dim, k, bias=False)
        init_weights(self.blocks)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.zeros_(self.head.weight)
        self._folder: Path | None = None
        self._probe: list[float] | None = None

    # -- config adaptation ------------------------------------------------------------------------
    @classmethod
    def config_for_data(cls, config: IGPTConfig, dataset: Any) -> IGPTConfig:
        """Take the dataset's channels and name (images are resized to ``image_size``)."""
        meta, s = dataset.meta, config.image_size
        size = meta.get("image_size")
        if isinstance(size, int) and size != s:  # one token per pixel: the sequence length is the variant's choice
            print(
                f"igpt: images are {size}×{size}×{meta.get('channels')}; resized to image_size {s} ({s * s} pixel "
                f"tokens; --set image_size={size} trains on all {size * size})"
            )
        return attrs.evolve(config, channels=meta.get("channels", config.channels), data=dataset.name)

    @classmethod
    def tiny_config(cls, config: IGPTConfig) -> IGPTConfig:
        """The same architecture at toy size (contract tests)."""
        return attrs.evolve(config, dim=16, depth=1, heads=2, image_size=min(config.image_size, 4), eval_samples=0)

    @property
    def num_tokens(self) -> int:
        """Image tokens per image, ``image_size²``."""
        return self.config.image_size**2

    # -- palette and tokens -----------------------------------------------------------------------
    def prepare(self, images: Tensor) -> Tensor:
        """Check the channels and resize (B, C, H, W) to (B, C, S, S) float."""
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != self.config.channels:
            got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"expected images (B, {self.config.channels}, H, W); got {got}")
        return resize(images.float(), self.config.image_size)

    @torch.no_grad()
    def fit_palette(self, images: Tensor) -> Tensor:
        """Fit the palette by k-means over the colours of ``images`` (B, C, H, W); returns it (K, C)."""
        fitted = pal.fit_palette(self.prepare(images).cpu(), self.config.palette_size, self.config.palette_seed)
        self.palette.copy_(fitted.to(self.palette))
        self.palette_fitted.fill_(True)
        return self.palette

    def tokens(self, images: Tensor) -> Tensor:
        """(B, C, H, W) images → (B, N) palette ids in raster order."""
        return pal.to_tokens(self.prepare(images).to(self.palette.device), self.palette)

    def images(self, tokens: Tensor) -> Tensor:
        """(B, N) palette ids → (B, C, S, S) images in [0, 1]."""
        return pal.to_images(tokens.to(self.palette.device), self.palette, self.config.image_size)

    def inputs(self, tokens: Tensor) -> Tensor:
        """The model's input stream ``[SOS, t_0 … t_{N-2}]`` (B, N) for image tokens (B, N)."""
        sos = torch.full_like(tokens[:, :1], self.sos)  # (B, 1)
        return torch.cat([sos, tokens[:, :-1]], dim=1)  # (B, N)

    # -- the network ------------------------------------------------------------------------------
    def token_embeddings(self, ids: Tensor) -> Tensor:
        """Token ids (B, T) → token embeddings (B, T, D), without positions (ids checked, ValueError)."""
        if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.dtype not in (torch.long, torch.int32, torch.int64):
            got = f"{tuple(ids.shape)} {ids.dtype}" if isinstance(ids, Tensor) else type(ids).__name__
            raise ValueError(f"expected integer token ids (B, T); got {got}")
        checked = not torch.compiler.is_compiling()  # a compiled decoding step gets the sampler's ids
        if checked and ids.numel() and (ids.min() < 0 or ids.max() > self.sos):
            raise ValueError(
                f"token ids must lie in [0, {self.sos}] (palette ids, {self.sos} = start); "
                f"got values in [{int(ids.min())}, {int(ids.max())}]"
            )
        return self.token_embed(ids.to(self.head.weight.device))  # (B, T, D)

    def position_rows(self, pos: Tensor) -> Tensor:
        """Position embeddings (n, D) of the positions ``pos`` (n,) (the decoder's ``positions``)."""
        return self.pos_embed()[0, pos]  # (n, D)

    @property
    def decoder(self) -> CausalDecoder:
        """The core causal decoder over this model's modules (built once, kept outside the state dict)."""
        dec = self.__dict__.get("_decoder")
        if dec is None:
            dec = CausalDecoder(
                self.blocks,
                tokens=self.token_embeddings,
                positions=self.position_rows,
                head=self.head,
                max_len=self.num_tokens,
                dropout=self.drop,
                owner=self,
            )
            self.__dict__["_decoder"] = dec
        return dec

    def _check_length(self, ids: Tensor, past: int) -> None:
        t = ids.shape[1] if isinstance(ids, Tensor) and ids.dim() == 2 else 0
        if past + t > self.num_tokens:
            raise ValueError(
                f"at most {self.num_tokens} positions ({self.config.image_size}×{self.config.image_size} "
                f"image); got {past} cached + {t} new"
            )

    def forward(self, ids: Tensor, cache: KVCache | None = None) -> Tensor:
        """Ids (B, T) → logits (B, T, K); with ``cache`` the ids continue the cached positions."""
        self._check_length(ids, cache.length if cache is not None else 0)
        return self.decoder(ids, cache)  # (B, T, K)

    def hidden_states(self, ids: Tensor) -> list[Tensor]:
        """The input of every block and the final (normed) output: ``depth + 1`` tensors (B, T, D)."""
        self._check_length(ids, 0)
        _, hidden = self.decoder.run(self.token_embeddings(ids), return_hidden=True)
        return hidden

    # -- training and evaluation ------------------------------------------------------------------
    def loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor | float]]:
        """Next-token cross-entropy over the raster-order tokens of ``batch['image']``.

        The palette is fitted on the first batch it sees when it has not been fitted yet.
        """
        if not bool(self.palette_fitted):
            self.fit_palette(batch["image"])
        images = self.prepare(batch["image"])  # (B, C, S, S)
        if self.training and self.config.augment_shift and self.config.augment_prob > 0:
            moved = random_translate(images, self.config.augment_shift)  # (B, C, S, S)
            pick = torch.rand(len(images), device=images.device) < self.config.augment_prob  # (B,)
            images = torch.where(pick[:, None, None, None], moved, images)
        tokens = self.tokens(images)  # (B, N)
        loss, metrics = cross_entropy(self(self.inputs(tokens)), tokens)
        metrics["bits_per_token"] = loss.detach().double() / math.log(2)
        return loss, metrics

    @torch.no_grad()
    def nll_bits(self, tokens: Tensor, batch_size: int = 256) -> float:
        """Mean next-token negative log-likelihood of image tokens (B, N), in bits per token."""
        total = 0.0
        for chunk in tokens.split(batch_size):
            logits = self(self.inputs(chunk))  # (b, N, K)
            total += F.cross_entropy(logits.flatten(0, 1).float(), chunk.flatten(), reduction="sum").item()
        return total / tokens.numel() / math.log(2)

    @torch.no_grad()
    def evaluate(self, dataset: Any, split: str = "test", plot_path: str | Path | None = None) -> dict[str, Any]:
        """Test NLL and the unigram baseline (bits/token), and a linear probe on every layer.

        The probe plot goes to ``plot_path``; else, for a model loaded from a folder, under the cache
        (:func:`probe_plot_path`), never into the folder itself, which evaluation only reads (it may be
        read-only). Its path is returned as ``probe_plot`` when written; a save carries the last
        evaluation's plot into the saved folder.
        """
        with eval_mode(self):
            if not bool(self.palette_fitted):
                self.fit_palette(dataset.train["image"])
            train, test = dataset.train, dataset.split(split)
            train_tokens, test_tokens = self.tokens(train["image"]), self.tokens(test["image"])  # (N_tr, N), (N_te, N)
            metrics: dict[str, Any] = {
                "test_nll_bits_per_token": self.nll_bits(test_tokens),
                "unigram_nll_bits_per_token": pal.unigram_bits(train_tokens, test_tokens, self.config.palette_size),
            }
            if "label" in train and "label" in test:
                feats_train = probe.pooled_features(self, self.inputs(train_tokens))
                feats_test = probe.pooled_features(self, self.inputs(test_tokens))
                accs = probe.probe_accuracies(
                    feats_train, train["label"], feats_test, test["label"], self.config.probe_l2
                )
                self._probe = accs
                best = max(range(len(accs)), key=accs.__getitem__)
                metrics.update(probe_accuracy_by_layer=accs, best_probe_accuracy=accs[best], best_probe_layer=best)
                target = (
                    Path(plot_path)
                    if plot_path is not None
                    else (probe_plot_path(self._folder) if self._folder is not None else None)
                )
                if target is not None:
                    metrics["probe_plot"] = str(probe.plot_probe(accs, target, self.plot_title(dataset.name)))
            if self.config.eval_samples:
                metrics["fd_judge"] = self.fd_judge(dataset, self.config.eval_samples)
        return metrics

    def plot_title(self, data: str) -> str:
        """Title of the probe plot."""
        return f"iGPT linear probe on {data} (width {self.config.dim}, depth {self.config.depth})"

    def example_inputs(self, batch_size: int = 2, generator: torch.Generator | None = None) -> tuple[Tensor]:
        """Random input streams (B, N): the start token, then random palette ids."""
        ids = torch.randint(0, self.config.palette_size, (batch_size, self.num_tokens), generator=generator)
        ids[:, 0] = self.sos
        return (ids,)

    # -- folders ----------------------------------------------------------------------------------
    def save_extras(self, directory: Path) -> None:
        """Write the probe plot of the last evaluation (if any) as ``probe_by_layer.png``."""
        if self._probe is not None:
            probe.plot_probe(self._probe, Path(directory) / "probe_by_layer.png", self.plot_title(self.config.data))

    def load_extras(self, directory: Path) -> None:
        """Remember the folder, so ``evaluate`` names its probe plot after it (under the cache)."""
        self._folder = Path(directory)

    def card_lines(self) -> list[str]:
        """Architecture summary for the model card."""
        c = self.config
        return [
            f"iGPT: {c.image_size}×{c.image_size}×{c.channels} images as {self.num_tokens} raster-order tokens "
            f"over a {c.palette_size}-colour k-means palette; decoder width {c.dim}, depth {c.depth}, "
            f"{c.heads} heads, RMS norm, {c.act} MLP, zero-initialised untied head.",
            "",
        ]

"""unCLIP's diffusion prior (Ramesh et al. 2022, §2.2): CLIP text encodings → a CLIP image embedding.

A causal transformer of core blocks over ``[text token encodings (L), text embedding, time embedding, noised
image embedding, learned query]`` (+ learned positions; causal ∧ text padding mask) predicts x0 at the query
(→ final norm → linear), laid out as diffusers' ``PriorTransformer`` (``convert_prior.py`` maps it 1:1). Image
embeddings are normalised by the training set's mean/std (``fit_stats``; identity until fitted); MSE on x0.

Guidance: in training ``text_dropout`` of the samples have the text *dropped*: embedding and tokens become the
learned ``null_text_embed``/``null_text_tokens`` (all L attended; DALLE2-pytorch's nulls); ``sample(null_text=)``
takes another (diffusers guides with the empty prompt's encodings: pass those to a converted model). Of
``candidates`` samples per prompt the highest dot product of unit vectors with the text embedding is kept.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.diffusion import NoiseSchedule, cfg_model, diffusion_loss, make_sampler
from polymodal.diffusion import sample as diffusion_sample
from polymodal.models import ModelSpec, PolymodalModel
from polymodal.models.recipe import TrainConfig
from polymodal.nn import BlockConfig, StackConfig, TransformerStack, eval_mode
from polymodal.nn.unet import TimeEmbedding, timestep_embedding

from .config import PriorConfig
from .prefix import EXTRA, STEP, PrefixCachedPrior, batch_timesteps, in_batch_order, row_groups

STANDALONE = (
    "unclip-prior learns from CLIP embeddings, which the `unclip` composite computes with its frozen CLIP: "
    "train it with `polymodal train unclip` (the prior is saved in the unclip folder's prior/ sub-folder)"
)


def _shaped(name: str, x: Any, *shape: int | str) -> Tensor:
    """``x`` if it is a tensor of ``shape`` (a str entry is free, named in the message), else a ValueError."""
    if not (
        isinstance(x, Tensor)
        and x.dim() == len(shape)
        and all(isinstance(s, str) or s == g for s, g in zip(shape, x.shape))
    ):
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must have shape ({', '.join(map(str, shape))}); got {got}")
    return x


def select_candidates(candidates: Tensor, text_embed: Tensor) -> Tensor:
    """Of ``candidates`` (K, B, E) keep, per prompt, the one whose unit vector has the highest dot product with
    the unit ``text_embed`` (B, E) (DALL·E 2 §2.2); returns (B, E)."""
    if candidates.dim() != 3 or text_embed.shape != candidates.shape[1:]:
        got = f"{tuple(candidates.shape)} and {tuple(text_embed.shape)}"
        raise ValueError(f"expected candidates (K, B, E) and text_embed (B, E); got {got}")
    sims = (F.normalize(candidates.float(), dim=-1) * F.normalize(text_embed.float(), dim=-1)).sum(-1)  # (K, B)
    best = sims.argmax(dim=0)  # (B,)
    return candidates[best, torch.arange(candidates.shape[1], device=best.device)]  # (B, E)


class DiffusionPrior(PolymodalModel):
    """``forward(noisy (B, E), t (B,), text_embed (B, E), text_tokens (B, L, Dt), text_mask (B, L))`` → the
    predicted clean image embedding x0 (B, E), in normalised space (diffusers' PriorTransformer output)."""

    family = "unclip-prior"
    trained_by = "unclip"
    config_class = PriorConfig
    inference_keep_fp32 = ("clip_mean", "clip_std")

    def __init__(self, config: PriorConfig) -> None:
        super().__init__(config)
        c, w = config, config.width
        self.time_embedding = TimeEmbedding(w, w)
        self.proj_in = nn.Linear(c.embed_dim, w)
        self.embedding_proj_norm = nn.LayerNorm(c.embed_dim, eps=c.norm_eps) if c.embed_norm else None
        self.embedding_proj = nn.Linear(c.embed_dim, w)
        self.encoder_hidden_states_proj = nn.Linear(c.text_dim, w)
        self.positional_embedding = nn.Parameter(0.02 * torch.randn(1, c.text_len + EXTRA, w))
        self.prd_embedding = nn.Parameter(0.02 * torch.randn(1, 1, w))
        self.norm_in = nn.LayerNorm(w, eps=c.norm_eps) if c.norm_in else None
        block = BlockConfig(dim=w, heads=c.heads, mlp_ratio=4.0, norm_eps=c.norm_eps, act="gelu", dropout=c.dropout)
        self.transformer = TransformerStack(StackConfig(depth=c.depth, block=block, final_norm=True))
        self.proj_to_clip_embeddings = nn.Linear(w, c.embed_dim)
        self.null_text_embed = nn.Parameter(0.02 * torch.randn(c.embed_dim))
        self.null_text_tokens = nn.Parameter(0.02 * torch.randn(c.text_len, c.text_dim))
        self.register_buffer("clip_mean", torch.zeros(c.embed_dim))
        self.register_buffer("clip_std", torch.ones(c.embed_dim))
        self.register_buffer("stats_fitted", torch.zeros((), dtype=torch.bool))
        self.schedule = NoiseSchedule(c.schedule)

    # -- config -------------------------------------------------------------------------------------
    @classmethod
    def config_for_data(cls, config: PriorConfig, dataset: Any, fixed: Any = ()) -> PriorConfig:
        """Refused: the prior trains on CLIP embeddings inside the ``unclip`` composite, not on a dataset."""
        raise ValueError(f"{STANDALONE}; got the dataset {getattr(dataset, 'name', dataset)!r}")

    @classmethod
    def tiny_config(cls, config: PriorConfig) -> PriorConfig:
        """Width 16, one block, two heads, 4 sampling steps; CLIP widths E = 16, Dt = 24 (the contract kit grows
        E to 24, the width of its grown tiny CLIP, and leaves Dt)."""
        import attrs

        return attrs.evolve(
            config, width=16, depth=1, heads=2, embed_dim=16, text_dim=24, sampler=attrs.evolve(config.sampler, steps=4)
        )

    # -- normalisation --------------------------------------------------------------------------------
    @torch.no_grad()
    def fit_stats(self, image_embeds: Tensor) -> None:
        """Store the per-dimension mean and std of the training set's CLIP image embeddings (N, E), N ≥ 2."""
        e = self.config.embed_dim
        if image_embeds.dim() != 2 or image_embeds.shape[1] != e or image_embeds.shape[0] < 2:
            raise ValueError(f"fit_stats expects image embeddings (N ≥ 2, E={e}); got {tuple(image_embeds.shape)}")
        x = image_embeds.detach().float()  # (N, E)
        self.clip_mean.copy_(x.mean(0))
        self.clip_std.copy_(x.std(0).clamp(min=1e-6))
        self.stats_fitted.fill_(True)

    def normalise(self, image_embed: Tensor) -> Tensor:
        """CLIP space → the prior's space: ``(x − clip_mean) / clip_std`` (B, E)."""
        return (image_embed - self.clip_mean) / self.clip_std  # (B, E)

    def denormalise(self, x: Tensor) -> Tensor:
        """The prior's space → CLIP space (diffusers' ``post_process_latents``) (B, E)."""
        return x * self.clip_std + self.clip_mean  # (B, E)

    # -- inputs ---------------------------------------------------------------------------------------
    def prepare_text(self, text_embed: Tensor, text_tokens: Tensor, text_mask: Tensor | None = None):
        """Checked text inputs, tokens right-padded (mask False) to L: ((B, E), (B, L, Dt), (B, L) bool)."""
        c = self.config
        text_embed = _shaped("text_embed", text_embed, "B", c.embed_dim)
        b = text_embed.shape[0]
        text_tokens = _shaped("text_tokens", text_tokens, b, "n", c.text_dim)
        n = text_tokens.shape[1]
        if not 1 <= n <= c.text_len:
            raise ValueError(f"text_tokens must hold 1 … L={c.text_len} tokens; got {n}")
        if text_mask is None:
            text_mask = torch.ones(b, n, dtype=torch.bool, device=text_tokens.device)
        text_mask = _shaped("text_mask", text_mask, b, n).to(text_tokens.device) != 0  # (B, n) bool
        pad = c.text_len - n
        if pad:
            text_tokens = F.pad(text_tokens, (0, 0, 0, pad))  # (B, L, Dt)
            text_mask = F.pad(text_mask, (0, pad), value=False)  # (B, L)
        return text_embed, text_tokens, text_mask

    def null_condition(self, b: int) -> tuple[Tensor, Tensor, Tensor]:
        """The learned dropped-text condition for ``b`` samples: ((b, E), (b, L, Dt), (b, L) all True)."""
        c = self.config
        mask = torch.ones(b, c.text_len, dtype=torch.bool, device=self.null_text_tokens.device)
        return self.null_text_embed.expand(b, -1), self.null_text_tokens.expand(b, -1, -1), mask

    # -- the network ----------------------------------------------------------------------------------
    def forward(
        self, noisy: Tensor, t: Tensor | int, text_embed: Tensor, text_tokens: Tensor, text_mask: Tensor | None = None
    ) -> Tensor:
        """The predicted x0 (B, E) of the noised normalised image embedding ``noisy`` (B, E) at timesteps ``t``."""
        noisy = _shaped("noisy", noisy, "B", self.config.embed_dim)
        b = noisy.shape[0]
        text_embed, text_tokens, mask = self.prepare_text(text_embed, text_tokens, text_mask)
        if text_embed.shape[0] != b:
            raise ValueError(f"text_embed must have the batch of noisy ({b}); got {text_embed.shape[0]}")
        t = torch.as_tensor(t, device=noisy.device)
        if t.dim() == 0 or t.shape == (1,):
            t = t.reshape(1).expand(b)  # (B,)
        if t.shape != (b,):
            raise ValueError(f"t must be a scalar or have shape ({b},); got {tuple(t.shape)}")
        return self._network(noisy, t, text_embed, text_tokens, mask)

    def _network(
        self, noisy: Tensor, t: Tensor, text_embed: Tensor, tokens: Tensor, mask: Tensor, kept: Tensor | None = None
    ) -> Tensor:
        """The transformer on checked inputs: x0 (B, E). ``kept`` (n,) are the text positions ``tokens`` (B, n, Dt)
        and ``mask`` (B, n) hold (None: all L); each token keeps its learned position (the four after the text
        keep L … L + 3), so positions no row attends can be left out without changing the result."""
        seq = torch.cat([self.text_prefix(text_embed, tokens, kept), self.step_tokens(noisy, t)], dim=1)  # (B, n+4, W)
        keys = torch.cat([mask, mask.new_ones(noisy.shape[0], EXTRA)], dim=1)  # (B, n + 4) True = attend
        h = self.transformer(seq, causal=True, key_padding=keys)  # (B, n + 4, W), norm_out applied
        return self.proj_to_clip_embeddings(h[:, -1])  # (B, E)

    def text_prefix(self, text_embed: Tensor, tokens: Tensor, kept: Tensor | None = None) -> Tensor:
        """The sequence's first n + 1 inputs (B, n + 1, W), projected, positioned and normed: the text tokens
        (B, n, Dt) and the text embedding (B, E). Under the causal mask nothing after them reaches them."""
        if self.embedding_proj_norm is not None:
            text_embed = self.embedding_proj_norm(text_embed)  # (B, E)
        L = self.config.text_len
        text = torch.arange(tokens.shape[1], device=tokens.device) if kept is None else kept  # (n,) their positions
        slots = torch.cat([text, text.new_tensor([L])])  # (n + 1,) the text embedding sits at L
        seq = torch.cat([self.encoder_hidden_states_proj(tokens), self.embedding_proj(text_embed)[:, None]], dim=1)
        seq = seq + self.positional_embedding[:, slots]  # (B, n + 1, W)
        return seq if self.norm_in is None else self.norm_in(seq)

    def step_tokens(self, noisy: Tensor, t: Tensor) -> Tensor:
        """The sequence's last STEP = 3 inputs (B, 3, W): the time embedding of ``t`` (B,), the noised embedding
        ``noisy`` (B, E) and the learned query, positioned (L + 1 … L + 3) and normed."""
        b, w, L = noisy.shape[0], self.config.width, self.config.text_len
        temb = self.time_embedding(timestep_embedding(t, w, flip_sin_to_cos=True, freq_shift=0))  # (B, W)
        seq = torch.cat([temb[:, None], self.proj_in(noisy)[:, None], self.prd_embedding.expand(b, -1, -1)], dim=1)
        seq = seq + self.positional_embedding[:, L + EXTRA - STEP : L + EXTRA]  # (B, 3, W)
        return seq if self.norm_in is None else self.norm_in(seq)

    def grouped_forward(self, noisy: Tensor, t: Tensor, text_embed: Tensor, tokens: Tensor, mask: Tensor) -> Tensor:
        """:meth:`forward` (checked inputs, tokens padded to L) computed without the text positions no row
        attends — the same x0 (B, E) at a fraction of the cost when captions are short. Rows that attend every
        position (the learned null text) run apart from the others, which then drop their common padding."""
        t = batch_timesteps(t, noisy.shape[0], noisy.device)  # (B,)
        groups = row_groups(mask)
        parts = [
            self._network(noisy[rows], t[rows], text_embed[rows], tokens[rows][:, kept], mask[rows][:, kept], kept)
            for rows, kept in groups
        ]
        return in_batch_order(groups, parts)  # (B, E)

    def loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        """MSE on x0 of the normalised ``image_embed``, with the text dropped for ``text_dropout`` of the batch."""
        missing = [k for k in ("image_embed", "text_embed", "text_tokens") if k not in batch]
        if missing:
            raise ValueError(f"{STANDALONE}. The batch lacks {missing}; it has {sorted(batch)}")
        dev = self.proj_in.weight.device
        image = _shaped("image_embed", batch["image_embed"], "B", self.config.embed_dim).to(dev).float()
        text_embed, tokens, mask = self.prepare_text(
            batch["text_embed"].to(dev).float(), batch["text_tokens"].to(dev).float(), batch.get("text_mask")
        )
        b = image.shape[0]
        if text_embed.shape[0] != b:
            raise ValueError(f"text_embed must have the batch of image_embed ({b}); got {text_embed.shape[0]}")
        dropped = torch.zeros(b, dtype=torch.bool, device=dev)  # (B,)
        if self.training and self.config.text_dropout > 0:
            dropped = torch.rand(b, device=dev) < self.config.text_dropout  # (B,)
            null_embed, null_tokens, null_mask = self.null_condition(b)
            text_embed = torch.where(dropped[:, None], null_embed, text_embed)  # (B, E)
            tokens = torch.where(dropped[:, None, None], null_tokens, tokens)  # (B, L, Dt)
            mask = torch.where(dropped[:, None], null_mask, mask)  # (B, L)
        loss, metrics = diffusion_loss(
            self.schedule, lambda x, t: self.grouped_forward(x, t, text_embed, tokens, mask), self.normalise(image)
        )
        return loss, {**metrics, "text_dropped": float(dropped.float().mean())}

    # -- sampling ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        text_embed: Tensor,
        text_tokens: Tensor,
        text_mask: Tensor | None = None,
        *,
        guidance_scale: float | None = None,
        steps: int | None = None,
        candidates: int | None = None,
        sampler: str | None = None,
        generator: torch.Generator | None = None,
        null_text: tuple[Tensor, Tensor, Tensor | None] | None = None,
    ) -> Tensor:
        """CLIP image embeddings (B, E), de-normalised: ``candidates`` per prompt sampled with classifier-free
        guidance (``guidance_scale``; 1 runs the conditional model only) and the closest to the text kept.
        ``steps``/``sampler`` override the config's sampler; ``null_text`` = (embed (1|B, E), tokens (1|B, n,
        Dt), mask (1|B, n) or None) replaces the learned null (a converted model: the empty prompt's)."""
        c = self.config
        k = c.candidates if candidates is None else candidates
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"candidates must be an integer ≥ 1; got {k!r}")
        dev = self.proj_in.weight.device
        text_embed, tokens, mask = self.prepare_text(text_embed.to(dev), text_tokens.to(dev), text_mask)
        b = text_embed.shape[0]
        null = self.null_condition(1) if null_text is None else self.prepare_text(*null_text)
        if null[0].shape[0] not in (1, b):
            raise ValueError(f"null_text must have batch 1 or {b} (the prompts'); got {null[0].shape[0]}")
        if null[0].shape[0] == b != 1:
            null = (null[0].repeat(k, 1), null[1].repeat(k, 1, 1), null[2].repeat(k, 1))  # as the candidates
        overrides = {"steps": steps, "name": sampler}
        chosen = make_sampler(self.schedule, c.sampler, **{n: v for n, v in overrides.items() if v is not None})
        scale = c.guidance_scale if guidance_scale is None else guidance_scale
        cond = {"embed": text_embed.repeat(k, 1), "tokens": tokens.repeat(k, 1, 1), "mask": mask.repeat(k, 1)}
        nulls = {
            "embed": null[0].to(dev, text_embed.dtype),
            "tokens": null[1].to(dev, tokens.dtype),
            "mask": null[2].to(dev),
        }
        fn = cfg_model(PrefixCachedPrior(self), cond, nulls, scale)  # the text's keys and values once, not per step
        with eval_mode(self):
            x0 = diffusion_sample(fn, chosen, (k * b, c.embed_dim), generator=generator, device=dev).images  # (KB, E)
        embeds = self.denormalise(x0).reshape(k, b, c.embed_dim)  # (K, B, E)
        return select_candidates(embeds, text_embed) if k > 1 else embeds[0]  # (B, E)

    # -- contract hooks ---------------------------------------------------------------------------------
    def example_batch(self, batch_size: int = 4, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """A random embedding batch as the composite gives it: image_embed, text_embed, text_tokens, text_mask."""
        c, g = self.config, generator
        lengths = torch.randint(1, c.text_len + 1, (batch_size,), generator=g)  # (B,)
        return {
            "image_embed": torch.randn(batch_size, c.embed_dim, generator=g),  # (B, E)
            "text_embed": torch.randn(batch_size, c.embed_dim, generator=g),  # (B, E)
            "text_tokens": torch.randn(batch_size, c.text_len, c.text_dim, generator=g),  # (B, L, Dt)
            "text_mask": torch.arange(c.text_len)[None] < lengths[:, None],  # (B, L)
        }

    def example_inputs(self, batch_size: int = 2, generator: torch.Generator | None = None) -> tuple:
        """Random ``forward`` inputs: noisy (B, E), t (B,), text_embed, text_tokens and a padded text_mask."""
        batch = self.example_batch(batch_size, generator)
        t = torch.randint(0, self.schedule.T, (batch_size,), generator=generator)  # (B,)
        return batch["image_embed"], t, batch["text_embed"], batch["text_tokens"], batch["text_mask"]

    @torch.no_grad()
    def evaluate(self, dataset: Any, split: str = "test") -> dict[str, float]:
        """Refused: the prior is evaluated through the ``unclip`` composite's samples."""
        raise ValueError(f"{STANDALONE}; evaluate the unclip folder instead")


VARIANTS = {
    "unclip-prior": ModelSpec(
        DiffusionPrior,
        PriorConfig(),
        data="digits",
        train=TrainConfig(steps=3000, batch_size=128, lr=1e-3, warmup_steps=100, checkpoint_every=0),
        doc="unCLIP diffusion prior (CLIP text → image embedding); a part trained by `polymodal train unclip`.",
    )
}

__all__ = ["EXTRA", "VARIANTS", "DiffusionPrior", "PriorConfig", "select_candidates"]

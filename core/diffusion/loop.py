"""The diffusion sampling loop: plain sampling, RePaint inpainting, outpainting canvases, DDIM inversion.

:func:`sample` walks a sampler's timesteps from ``x_T`` to ``x_0`` with any ``model_fn(x_t, t)``
(a bare model, or one wrapped by :mod:`polymodal.diffusion.guidance`). Given ``known`` pixels and a
``mask`` it inpaints as RePaint does (Lugmayr et al. 2022): after every step the known region is
replaced by the original, forward-noised to the new step's noise level, and with ``resample > 1``
the step is repeated by re-noising ``x_{t-1} → x_t`` (``jump`` steps at a time, the paper's j).
:func:`invert` runs DDIM backwards (``x_0 → x_T``) and :func:`reconstruct` forwards again.
Images are in [-1, 1] here; a family maps its [0, 1] data in and out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

ModelFn = Callable[[Tensor, Tensor], Tensor]

__all__ = ["SampleResult", "invert", "outpaint_canvas", "repaint_schedule", "reconstruct", "sample"]


@dataclass
class SampleResult:
    """What :func:`sample` returns.

    ``images`` (B, C, H, W) is the final ``x_0`` in [-1, 1]; ``trajectory`` (K, B, C, H, W) the
    captured ``x_t`` (every ``trajectory_every`` model calls, then ``x_0``), or None when not asked;
    ``trajectory_timesteps`` the timestep of each captured frame (-1 for ``x_0``); ``model_calls``
    how many times the model ran (RePaint's resampling makes it more than the sampler's steps).
    """

    images: Tensor
    trajectory: Tensor | None = None
    trajectory_timesteps: list[int] = field(default_factory=list)
    model_calls: int = 0


def _timesteps(sampler) -> list[int]:
    """The sampler's visited timesteps as Python ints (descending), refusing an empty schedule."""
    steps = [int(t) for t in torch.as_tensor(sampler.timesteps).reshape(-1).tolist()]
    if not steps:
        raise ValueError("the sampler visits no timesteps: expected at least 1 step, got 0")
    if any(a <= b for a, b in zip(steps, steps[1:])):
        raise ValueError(f"the sampler's timesteps must be strictly descending; got {steps}")
    return steps


def _check_positive_int(value, name: str) -> int:
    """``value`` as an int ≥ 1, else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer ≥ 1; got {value!r}")
    return value


def _check_mask(known: Tensor, mask: Tensor, x_shape: tuple[int, ...]) -> Tensor:
    """The inpainting mask as a bool tensor that broadcasts over the sample, else a ValueError."""
    if tuple(known.shape) != tuple(x_shape):
        raise ValueError(f"the known image must have the sample's shape {tuple(x_shape)}; got {tuple(known.shape)}")
    if mask.dim() != len(x_shape):
        raise ValueError(
            f"the mask must be (B or 1, 1 or C, H, W) for an image of shape {tuple(known.shape)}; "
            f"got mask shape {tuple(mask.shape)}"
        )
    b, c = x_shape[0], x_shape[1]
    ok = mask.shape[0] in (1, b) and mask.shape[1] in (1, c) and tuple(mask.shape[2:]) == tuple(x_shape[2:])
    if not ok:
        raise ValueError(
            f"the mask's size differs from the image's: mask {tuple(mask.shape)}, image {tuple(known.shape)} "
            f"(expected (B or 1, 1 or C, {', '.join(str(s) for s in x_shape[2:])}))"
        )
    if mask.dtype != torch.bool:
        if mask.dtype.is_floating_point and not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("a non-bool mask must hold only 0 and 1 (1 = known)")
        mask = mask != 0
    return mask


def repaint_schedule(steps: int, resample: int = 1, jump: int = 1) -> list[int]:
    """RePaint's walk over ``steps`` noise levels: the level after each move (Lugmayr et al., Alg. 1 & §4.3).

    Level ``L`` means "``L`` denoising steps left" (``steps`` is ``x_T``, 0 is ``x_0``); a move to a
    lower level is one model call, a move up is a re-noising jump of ``jump`` levels. Every
    ``jump``-th level (from the bottom, ``x_0`` excluded) is revisited ``resample − 1`` times.
    ``resample = jump = 1`` is the plain descent ``steps − 1, …, 0``.
    """
    _check_positive_int(steps, "steps")
    _check_positive_int(resample, "resample")
    _check_positive_int(jump, "jump")
    left = {k + 1: resample - 1 for k in range(0, steps - jump, jump)}
    level, walk = steps, []
    while level >= 1:
        level -= 1
        walk.append(level)
        if left.get(level, 0) > 0:
            left[level] -= 1
            level += jump
            walk.append(level)
    return walk


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, device, dtype: torch.dtype) -> Tensor:
    """Standard normal noise drawn on the generator's device (so a CPU generator seeds CUDA sampling too)."""
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


def _alpha_bar_fn(sampler, device) -> Callable[[int], Tensor]:
    """ᾱ at a timestep of ``sampler``'s schedule as a float64 scalar; a negative timestep is the final ᾱ
    (1, or the DDIM sampler's ``final_alpha_cumprod``)."""
    ab_all = sampler.schedule.alphas_cumprod.to(device=device, dtype=torch.float64)  # (T,)
    final = torch.as_tensor(getattr(sampler, "final_alpha_cumprod", 1.0), dtype=torch.float64, device=device)

    def ab_of(t: int) -> Tensor:
        return ab_all[t] if t >= 0 else final

    return ab_of


def _bshape(v: Tensor, like: Tensor) -> Tensor:
    """A per-sample or scalar float64 tensor reshaped to broadcast over ``like`` and cast to its dtype."""
    return v.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


@torch.no_grad()
def sample(
    model_fn: ModelFn,
    sampler,
    shape: tuple[int, ...] | None = None,
    *,
    x_T: Tensor | None = None,
    generator: torch.Generator | None = None,
    known: Tensor | None = None,
    mask: Tensor | None = None,
    resample: int = 1,
    jump: int = 1,
    trajectory_every: int = 0,
    progress: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> SampleResult:
    """Sample ``x_0`` by stepping ``sampler`` from ``x_T`` down its timesteps with ``model_fn(x_t, t)``.

    ``x_T`` is given or drawn from ``generator`` with ``shape`` (B, C, H, W); ``model_fn`` gets ``t``
    as an int64 tensor (B,). With ``known`` (B, C, H, W) in [-1, 1] and ``mask`` (B or 1, 1 or C, H, W)
    (True = known) it inpaints RePaint-style (see :func:`repaint_schedule` for ``resample``/``jump``);
    the returned known region equals ``known`` exactly. ``trajectory_every > 0`` captures ``x_t``
    every that many model calls, plus ``x_0``; ``progress`` shows a tqdm bar.
    """
    steps = _timesteps(sampler)
    resample, jump = _check_positive_int(resample, "resample"), _check_positive_int(jump, "jump")
    if isinstance(trajectory_every, bool) or not isinstance(trajectory_every, int) or trajectory_every < 0:
        raise ValueError(f"trajectory_every must be an integer ≥ 0; got {trajectory_every!r}")
    if x_T is None:
        if shape is None:
            raise ValueError("sample needs a shape (B, C, H, W) or x_T; got neither")
        x = _randn(tuple(shape), generator, device, dtype)  # (B, C, H, W)
    else:
        if shape is not None and tuple(shape) != tuple(x_T.shape):
            raise ValueError(f"shape and x_T disagree: shape {tuple(shape)}, x_T {tuple(x_T.shape)}")
        x = x_T.clone()  # (B, C, H, W)
    if (known is None) != (mask is None):
        raise ValueError("inpainting needs both known and mask; got only " + ("known" if mask is None else "mask"))
    if known is None and (resample > 1 or jump > 1):
        raise ValueError(
            f"resample and jump apply to inpainting (known and mask); got resample={resample}, jump={jump} without them"
        )
    if known is not None:
        mask = _check_mask(known, mask, tuple(x.shape)).to(x.device)  # (B|1, C|1, H, W)
        known = known.to(device=x.device, dtype=x.dtype)  # (B, C, H, W)
        ab_of = _alpha_bar_fn(sampler, x.device)

    n = len(steps)
    walk = repaint_schedule(n, resample, jump) if known is not None else list(range(n - 1, -1, -1))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(1 for a, b in zip([n, *walk], walk) if b < a), desc="sampling", unit="step")
    frames, frame_ts, calls = [], [], 0
    level, noise_t = n, steps[0]  # walk level; the timestep whose noise level x has (< 0: the final one)
    for new_level in walk:
        if new_level > level:  # RePaint: re-noise by q(x_t' | x_t) up to a higher visited timestep
            t_up = steps[n - new_level]
            ratio = ab_of(t_up) / ab_of(noise_t)
            noise = _randn(x.shape, generator, x.device, x.dtype)
            x = _bshape(ratio.sqrt(), x) * x + _bshape((1 - ratio).sqrt(), x) * noise  # (B, C, H, W)
            level, noise_t = new_level, t_up
            continue
        t = steps[n - level]
        if trajectory_every and calls % trajectory_every == 0:
            frames.append(x.clone())
            frame_ts.append(t)
        tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)  # (B,)
        out = model_fn(x, tt)  # (B, C', H, W)
        x = sampler.step(out, t, x, generator=generator).prev  # (B, C, H, W)
        calls += 1
        level, noise_t = new_level, (sampler.previous(t) if new_level > 0 else -1)
        if known is not None:
            if level == 0:
                known_t = known  # (B, C, H, W): the result keeps the known pixels exactly
            else:  # the original, forward-noised to the level the step reached
                ab = ab_of(noise_t)
                noise = _randn(x.shape, generator, x.device, x.dtype)
                known_t = _bshape(ab.sqrt(), x) * known + _bshape((1 - ab).sqrt(), x) * noise  # (B, C, H, W)
            x = torch.where(mask, known_t, x)  # (B, C, H, W)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    trajectory = None
    if trajectory_every:
        frames.append(x.clone())
        frame_ts.append(-1)
        trajectory = torch.stack(frames)  # (K, B, C, H, W)
    return SampleResult(images=x, trajectory=trajectory, trajectory_timesteps=frame_ts, model_calls=calls)


@torch.no_grad()
def invert(model_fn: ModelFn, sampler, x0: Tensor, *, refine: int = 0, progress: bool = False) -> Tensor:
    """DDIM inversion: the ``x_T`` from which deterministic DDIM (η = 0) sampling returns ``x0``.

    Each DDIM step is run backwards, from ``x0`` (at the final ᾱ) up to the sampler's lowest visited
    timestep and then with ``sampler.invert_step`` up the visited timesteps to the highest, where
    :func:`reconstruct` starts: one model call per step, as many as sampling. The plain inversion
    (``refine=0``, Song et al. §4.3) estimates the noise at the current, less noisy sample, exact only
    in the limit of many steps; ``refine=k`` re-estimates it k times at the new, noisier sample (a
    fixed-point iteration towards the exact inverse of each step, k more model calls per step).
    """
    if not hasattr(sampler, "invert_step"):
        raise ValueError(f"inversion needs a DDIM sampler (with invert_step); got {type(sampler).__name__}")
    if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
        raise ValueError(f"refine must be an integer ≥ 0; got {refine!r}")
    steps = _timesteps(sampler)
    schedule, ab_of = sampler.schedule, _alpha_bar_fn(sampler, x0.device)
    x = x0.clone()  # (B, C, H, W)

    def at(t: int) -> Tensor:
        return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)  # (B,)

    # the last sampling step (lowest visited t → the final ᾱ) backwards: x_t = sqrt(ᾱ_t) x̂0 + sqrt(1 − ᾱ_t) ε
    t_low, ab_f = steps[-1], ab_of(-1)
    ab_low = ab_of(t_low)

    def lift(eps: Tensor) -> Tensor:
        x0_hat = (x - (1 - ab_f).sqrt().to(x.dtype) * eps) / ab_f.sqrt().to(x.dtype)  # (B, C, H, W)
        return ab_low.sqrt().to(x.dtype) * x0_hat + (1 - ab_low).sqrt().to(x.dtype) * eps  # (B, C, H, W)

    x_up = lift(schedule.to_eps(model_fn(x, at(t_low)), x, at(t_low)))  # (B, C, H, W)
    for _ in range(refine):
        x_up = lift(schedule.to_eps(model_fn(x_up, at(t_low)), x_up, at(t_low)))
    x = x_up
    pairs = list(zip(reversed(steps[1:]), reversed(steps[:-1])))  # (t, the next noisier visited t), upwards
    if progress:
        from tqdm.auto import tqdm

        pairs = tqdm(pairs, desc="inverting", unit="step")
    for t, t_up in pairs:
        x_up = sampler.invert_step(model_fn(x, at(t)), t, x)  # (B, C, H, W): at t_up
        for _ in range(refine):
            eps = schedule.to_eps(model_fn(x_up, at(t_up)), x_up, at(t_up))  # (B, C, H, W): the noise seen from above
            x_up = sampler.invert_step(schedule.from_eps(eps, x, at(t)), t, x)  # (B, C, H, W)
        x = x_up
    return x


def reconstruct(model_fn: ModelFn, sampler, x_T: Tensor, *, progress: bool = False) -> Tensor:
    """Deterministic sampling from an inverted ``x_T`` (:func:`invert`): the round trip ``x0 → x_T → x0``."""
    return sample(model_fn, sampler, x_T=x_T, progress=progress).images


def outpaint_canvas(image: Tensor, pixels: int, *, keep_size: bool = False, fill: float = 0.0) -> tuple[Tensor, Tensor]:
    """A canvas for outpainting ("zooming out") and its mask (True = known), for :func:`sample`.

    By default the canvas is ``pixels`` larger on every side (B, C, H + 2p, W + 2p) with ``image`` in
    the middle. ``keep_size=True`` keeps the image's size: the image is shrunk (area-averaged) to
    (H − 2p, W − 2p) and placed in the centre, so a model trained at one size zooms out. The
    unknown border holds ``fill`` (the sampler replaces it). Returns ``(known, mask)`` with mask
    (B, 1, H', W') bool.
    """
    if not isinstance(image, Tensor) or image.dim() != 4:
        got = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"image must be a (B, C, H, W) tensor; got {got}")
    _check_positive_int(pixels, "pixels")
    b, c, h, w = image.shape
    if keep_size:
        if 2 * pixels >= min(h, w):
            raise ValueError(
                f"pixels must be at most {(min(h, w) - 1) // 2} to shrink a {h}×{w} image into itself; got {pixels}"
            )
        inner = F.interpolate(image.float(), size=(h - 2 * pixels, w - 2 * pixels), mode="area").to(image.dtype)
        size = (h, w)
    else:
        inner, size = image, (h + 2 * pixels, w + 2 * pixels)
    known = torch.full((b, c, *size), float(fill), dtype=image.dtype, device=image.device)  # (B, C, H', W')
    mask = torch.zeros((b, 1, *size), dtype=torch.bool, device=image.device)  # (B, 1, H', W')
    ih, iw = inner.shape[-2:]
    known[:, :, pixels : pixels + ih, pixels : pixels + iw] = inner
    mask[:, :, pixels : pixels + ih, pixels : pixels + iw] = True
    return known, mask

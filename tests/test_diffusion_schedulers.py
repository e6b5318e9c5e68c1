"""Noise schedules, the DDPM and DDIM samplers and the `diffusion` objective — and their parity with diffusers.

Every sampler ``step`` is compared with diffusers' ``DDPMScheduler.step`` / ``DDIMScheduler.step``
for the same options (schedules × prediction types × variance types × spacings × clipping ×
thresholding), at hypothesis-drawn timesteps and shapes.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from polymodal.diffusion import (
    DDIMSampler,
    DDPMSampler,
    NoiseSchedule,
    SamplerConfig,
    ScheduleConfig,
    diffusion_loss,
    make_sampler,
)
from polymodal.diffusion.objective import vlb_terms

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DDPMScheduler  # noqa: E402

KINDS = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTIONS = ("epsilon", "sample", "v_prediction")
SPACINGS = ("leading", "trailing", "linspace")
ATOL = 1e-6

shapes = st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 6), st.integers(1, 6))
seeds = st.integers(0, 2**31 - 1)


def _randn(shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    # diffusers itself returns NaN where ᾱ_t underflows (squaredcos_cap_v2 at t = T − 1 with η > 0): the
    # NaNs must then sit at the same places
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0, equal_nan=True)


@st.composite
def ddpm_cases(draw):
    T = draw(st.sampled_from([1000, draw(st.integers(2, 300))]))
    steps = draw(st.sampled_from([0, draw(st.integers(1, T))]))
    spacing = draw(st.sampled_from(SPACINGS))
    offset = draw(st.integers(0, 2)) if spacing == "leading" and steps else 0
    if steps and spacing == "leading" and (steps - 1) * (T // steps) + offset >= T:
        offset = 0
    return dict(
        T=T,
        kind=draw(st.sampled_from(KINDS)),
        prediction=draw(st.sampled_from(PREDICTIONS)),
        variance=draw(st.sampled_from(("fixed_small", "fixed_large", "learned_range"))),
        steps=steps,
        spacing=spacing,
        offset=offset,
        clip=draw(st.booleans()),
        thresholding=draw(st.booleans()),
        ratio=draw(st.sampled_from([0.9, 0.995])),
        max_value=draw(st.sampled_from([1.0, 1.5, 3.0])),
        clip_range=draw(st.sampled_from([1.0, 2.0])),
    )


@settings(max_examples=120, deadline=None)
@given(ddpm_cases(), shapes, seeds, st.data())
def test_ddpm_step_equals_diffusers(case, shape, seed, data):
    schedule = NoiseSchedule(ScheduleConfig(kind=case["kind"], timesteps=case["T"], prediction=case["prediction"]))
    cfg = SamplerConfig(
        name="ddpm",
        steps=case["steps"],
        spacing=case["spacing"],
        steps_offset=case["offset"],
        variance=case["variance"],
        clip_sample=case["clip"],
        clip_range=case["clip_range"],
        thresholding=case["thresholding"],
        threshold_ratio=case["ratio"],
        threshold_max=case["max_value"],
    )
    ours = make_sampler(schedule, cfg)
    theirs = DDPMScheduler(
        num_train_timesteps=case["T"],
        beta_schedule=case["kind"],
        prediction_type=case["prediction"],
        variance_type=case["variance"],
        clip_sample=case["clip"],
        clip_sample_range=case["clip_range"],
        thresholding=case["thresholding"],
        dynamic_thresholding_ratio=case["ratio"],
        sample_max_value=case["max_value"],
        timestep_spacing=case["spacing"],
        steps_offset=case["offset"],
    )
    if case["steps"]:
        theirs.set_timesteps(case["steps"])
    assert torch.equal(ours.timesteps, theirs.timesteps)
    t = int(data.draw(st.sampled_from(ours.timesteps.tolist())))
    b, c, h, w = shape
    out_c = 2 * c if case["variance"] == "learned_range" else c
    output = _randn((b, out_c, h, w), seed, 2.0)  # (B, C or 2C, H, W): outside [-1, 1] so clipping matters
    x_t = _randn((b, c, h, w), seed + 1, 1.5)  # (B, C, H, W)
    got = ours.step(output, t, x_t, generator=torch.Generator().manual_seed(seed))
    want = theirs.step(output, t, x_t, generator=torch.Generator().manual_seed(seed))
    _close(got.x0, want.pred_original_sample)
    _close(got.prev, want.prev_sample)
    assert ours.previous(t) == int(theirs.previous_timestep(t))


@st.composite
def ddim_cases(draw):
    T = draw(st.sampled_from([1000, draw(st.integers(2, 300))]))
    steps = draw(st.integers(1, min(T, 100)))
    spacing = draw(st.sampled_from(SPACINGS))
    offset = draw(st.integers(0, 2)) if spacing == "leading" else 0
    if spacing == "leading" and (steps - 1) * (T // steps) + offset >= T:
        offset = 0
    return dict(
        T=T,
        kind=draw(st.sampled_from(KINDS)),
        prediction=draw(st.sampled_from(PREDICTIONS)),
        steps=steps,
        spacing=spacing,
        offset=offset,
        eta=draw(st.sampled_from([0.0, 0.3, 1.0])),
        clip=draw(st.booleans()),
        thresholding=draw(st.booleans()),
        ratio=draw(st.sampled_from([0.9, 0.995])),
        max_value=draw(st.sampled_from([1.0, 2.0])),
        alpha_to_one=draw(st.booleans()),
    )


@settings(max_examples=120, deadline=None)
@given(ddim_cases(), shapes, seeds, st.data())
def test_ddim_step_equals_diffusers(case, shape, seed, data):
    schedule = NoiseSchedule(ScheduleConfig(kind=case["kind"], timesteps=case["T"], prediction=case["prediction"]))
    ours = make_sampler(
        schedule,
        name="ddim",
        steps=case["steps"],
        spacing=case["spacing"],
        steps_offset=case["offset"],
        eta=case["eta"],
        clip_sample=case["clip"],
        thresholding=case["thresholding"],
        threshold_ratio=case["ratio"],
        threshold_max=case["max_value"],
        set_alpha_to_one=case["alpha_to_one"],
    )
    theirs = DDIMScheduler(
        num_train_timesteps=case["T"],
        beta_schedule=case["kind"],
        prediction_type=case["prediction"],
        clip_sample=case["clip"],
        thresholding=case["thresholding"],
        dynamic_thresholding_ratio=case["ratio"],
        sample_max_value=case["max_value"],
        timestep_spacing=case["spacing"],
        steps_offset=case["offset"],
        set_alpha_to_one=case["alpha_to_one"],
    )
    theirs.set_timesteps(case["steps"])
    assert torch.equal(ours.timesteps, theirs.timesteps)
    t = int(data.draw(st.sampled_from(ours.timesteps.tolist())))
    output, x_t = _randn(shape, seed, 2.0), _randn(shape, seed + 1, 1.5)  # (B, C, H, W) each
    got = ours.step(output, t, x_t, generator=torch.Generator().manual_seed(seed))
    want = theirs.step(output, t, x_t, eta=case["eta"], generator=torch.Generator().manual_seed(seed))
    _close(got.x0, want.pred_original_sample)
    _close(got.prev, want.prev_sample)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(KINDS), st.integers(2, 1000), shapes, seeds)
def test_add_noise_and_velocity_equal_diffusers(kind, T, shape, seed):
    schedule = NoiseSchedule(ScheduleConfig(kind=kind, timesteps=T))
    theirs = DDPMScheduler(num_train_timesteps=T, beta_schedule=kind)
    assert torch.equal(schedule.alphas_cumprod, theirs.alphas_cumprod)
    x0, noise = _randn(shape, seed), _randn(shape, seed + 1)  # (B, C, H, W) each
    t = torch.randint(0, T, (shape[0],), generator=torch.Generator().manual_seed(seed))  # (B,)
    _close(schedule.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t))
    _close(schedule.velocity(x0, noise, t), theirs.get_velocity(x0, noise, t))


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(KINDS), st.sampled_from(PREDICTIONS), shapes, seeds)
def test_prediction_conversions_round_trip(kind, prediction, shape, seed):
    """In float64: the target of (x0, ε) converts back to x0 and ε, and from_eps inverts to_eps."""
    schedule = NoiseSchedule(ScheduleConfig(kind=kind, prediction=prediction))
    x0, noise = _randn(shape, seed).double(), _randn(shape, seed + 1).double()  # (B, C, H, W)
    t = torch.randint(0, 990, (shape[0],), generator=torch.Generator().manual_seed(seed))  # (B,)
    x_t = schedule.add_noise(x0, noise, t)  # (B, C, H, W)
    out = schedule.target(x0, noise, t)  # (B, C, H, W)
    torch.testing.assert_close(schedule.to_x0(out, x_t, t), x0, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(schedule.to_eps(out, x_t, t), noise, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(schedule.from_eps(noise, x_t, t), out, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_min_snr_weights_follow_hang_et_al(prediction):
    """min(SNR, γ) in x0 space, divided by SNR for ε and by SNR + 1 for v (as diffusers' training scripts)."""
    from diffusers.training_utils import compute_snr

    schedule = NoiseSchedule(ScheduleConfig(prediction=prediction))
    theirs = DDPMScheduler()
    t = torch.tensor([0, 5, 100, 400, 700, 999])  # (6,)
    snr = compute_snr(theirs, t)  # (6,)
    torch.testing.assert_close(schedule.snr(t), snr, rtol=1e-5, atol=0)
    want = torch.stack([snr, 5.0 * torch.ones_like(snr)], dim=1).min(dim=1)[0]  # (6,)
    want = {"epsilon": want / snr, "sample": want, "v_prediction": want / (snr + 1)}[prediction]
    torch.testing.assert_close(schedule.loss_weight(t, "min_snr", 5.0), want, rtol=1e-5, atol=0)
    assert torch.equal(schedule.loss_weight(t), torch.ones(6))


def _gaussian_eps(schedule: NoiseSchedule, mu: float, sigma: float):
    """The exact ε-prediction E[ε | x_t] for data x0 ~ N(mu, sigma² I)."""

    def model_fn(x, t):
        ab = schedule.alpha_bar(t, x).double()  # (B, 1, 1, 1)
        return ((1 - ab) ** 0.5 * (x - ab**0.5 * mu) / (ab * sigma**2 + 1 - ab)).to(x.dtype)  # (B, C, H, W)

    return model_fn


def _ddim_loop(sampler, model_fn, x):
    for t in sampler.timesteps.tolist():
        x = sampler.step(model_fn(x, torch.full((x.shape[0],), t)), t, x).prev  # (B, C, H, W)
    return x


@pytest.mark.parametrize("spacing", SPACINGS)
def test_a_whole_ddim_loop_equals_diffusers_and_eta_zero_is_deterministic(spacing):
    schedule = NoiseSchedule(ScheduleConfig(kind="squaredcos_cap_v2"))
    model_fn = _gaussian_eps(schedule, 0.3, 0.5)
    ours = make_sampler(schedule, name="ddim", steps=30, spacing=spacing)
    theirs = DDIMScheduler(beta_schedule="squaredcos_cap_v2", timestep_spacing=spacing)
    theirs.set_timesteps(30)
    x_T = _randn((2, 1, 6, 6), 0)  # (B, C, H, W)
    x = x_T
    for t in theirs.timesteps.tolist():
        x = theirs.step(model_fn(x, torch.full((2,), t)), t, x).prev_sample  # (B, C, H, W)
    got = _ddim_loop(ours, model_fn, x_T)
    torch.testing.assert_close(got, x, atol=1e-6, rtol=0)
    again = x_T
    for t in ours.timesteps.tolist():  # η = 0: the generator changes nothing
        out = model_fn(again, torch.full((2,), t))  # (B, C, H, W)
        again = ours.step(out, t, again, generator=torch.Generator().manual_seed(t)).prev
    assert torch.equal(again, got)


def test_a_whole_respaced_ddpm_loop_equals_diffusers_with_the_same_generator():
    schedule = NoiseSchedule(ScheduleConfig())
    model_fn = _gaussian_eps(schedule, -0.2, 0.4)
    ours = make_sampler(schedule, name="ddpm", steps=25, variance="fixed_large")
    theirs = DDPMScheduler(variance_type="fixed_large")
    theirs.set_timesteps(25)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = b = _randn((2, 1, 5, 5), 1)  # (B, C, H, W)
    for t in ours.timesteps.tolist():
        a = ours.step(model_fn(a, torch.full((2,), t)), t, a, generator=g1).prev
        b = theirs.step(model_fn(b, torch.full((2,), t)), t, b, generator=g2).prev_sample
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["linear", "squaredcos_cap_v2"])
def test_ddim_inversion_then_sampling_returns_the_data(kind):
    """With the exact ε of Gaussian data, x0 → invert → x_T → DDIM → x0 has a first-order error in the step size."""
    schedule = NoiseSchedule(ScheduleConfig(kind=kind))
    model_fn = _gaussian_eps(schedule, 0.3, 0.5)
    x0 = (0.3 + 0.5 * _randn((8, 1, 8, 8), 0)).double()  # (B, C, H, W)
    errors = []
    for steps in (100, 200):
        sampler = make_sampler(schedule, name="ddim", steps=steps, clip_sample=False)
        x = x0
        for t in sampler.timesteps.flip(0).tolist()[:-1]:  # up the visited timesteps
            x = sampler.invert_step(model_fn(x, torch.full((8,), t)), t, x)  # (B, C, H, W)
        assert abs(float(x.std()) - 1.0) < 0.1  # x_T looks like unit noise
        errors.append(float((_ddim_loop(sampler, model_fn, x) - x0).pow(2).mean()))
    assert errors[1] <= 1e-3
    assert errors[1] < errors[0] / 3  # halving the step size roughly quarters the squared error


def test_samplers_never_change_the_schedule():
    schedule = NoiseSchedule(ScheduleConfig(timesteps=100))
    before = schedule.alphas_cumprod.clone()
    for name in ("ddpm", "ddim"):
        sampler = make_sampler(schedule, name=name, steps=10)
        sampler.step(torch.randn(1, 1, 2, 2), int(sampler.timesteps[0]), torch.randn(1, 1, 2, 2))
    assert torch.equal(schedule.alphas_cumprod, before) and schedule.T == 100
    assert len(make_sampler(schedule, name="ddpm").timesteps) == 100
    assert len(make_sampler(schedule, name="ddim").timesteps) == 50


def test_the_diffusion_sampler_kind_lists_ddpm_and_ddim():
    from polymodal.registry import get_registry

    registry = get_registry()
    assert {"ddpm", "ddim"} <= set(registry.names("diffusion_sampler"))
    assert registry.get("diffusion_sampler", "ddpm") is DDPMSampler
    assert registry.get("diffusion_sampler", "ddim") is DDIMSampler
    assert registry.get("objective", "diffusion") is diffusion_loss
    assert "ddpm" not in registry.names("token_sampler")


class _TinyDenoiser(nn.Module):
    def __init__(self, out_channels: int = 1):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(2, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, out_channels, 3, padding=1))

    def forward(self, x, t):
        tt = (t.float() / 100).reshape(-1, 1, 1, 1).expand(-1, 1, *x.shape[2:])  # (B, 1, H, W)
        return self.net(torch.cat([x, tt], dim=1))  # (B, out, H, W)


@pytest.mark.parametrize(
    "prediction,weighting,learned",
    [("epsilon", "none", False), ("v_prediction", "min_snr", False), ("epsilon", "none", True)],
)
def test_the_loss_decreases_when_a_tiny_model_trains(prediction, weighting, learned):
    torch.manual_seed(0)
    schedule = NoiseSchedule(ScheduleConfig(timesteps=100, prediction=prediction))
    model = _TinyDenoiser(2 if learned else 1)
    bars = torch.zeros(16, 1, 8, 8)  # (B, 1, H, W): vertical bars in [-1, 1]
    bars[:, :, :, ::2] = 1.0
    bars = bars * 2 - 1
    fixed = dict(
        noise=_randn(bars.shape, 7), t=torch.randint(0, 100, (16,), generator=torch.Generator().manual_seed(8))
    )

    def evaluate():
        with torch.no_grad():
            return diffusion_loss(schedule, model, bars, weighting=weighting, learned_variance=learned, **fixed)

    start, start_metrics = evaluate()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(80):
        loss, _ = diffusion_loss(schedule, model, bars, generator=g, weighting=weighting, learned_variance=learned)
        opt.zero_grad()
        loss.backward()
        opt.step()
    end, end_metrics = evaluate()
    assert float(end) < 0.6 * float(start)
    assert end_metrics["mse"] < start_metrics["mse"]
    if learned:
        assert end_metrics["vlb"] < start_metrics["vlb"]


def test_the_vlb_term_trains_only_the_variance_and_vanishes_at_the_true_posterior():
    schedule = NoiseSchedule(ScheduleConfig(timesteps=50))
    x0 = torch.rand(4, 1, 4, 4) * 2 - 1  # (B, C, H, W)
    noise = _randn(x0.shape, 0)
    t = torch.tensor([3, 10, 25, 49])  # (B,)
    x_t = schedule.add_noise(x0, noise, t)  # (B, C, H, W)
    exact = torch.cat([noise, -torch.ones_like(noise)], dim=1)  # (B, 2C, H, W): true ε, variance = β̃_t
    assert float(vlb_terms(schedule, exact, x0, x_t, t).abs().max()) < 1e-4
    output = torch.randn(4, 2, 4, 4, requires_grad=True)  # (B, 2C, H, W)
    loss, metrics = diffusion_loss(
        schedule, lambda x, tt: output, x0, noise=noise, t=t, learned_variance=True, vlb_weight=1.0
    )
    (grad,) = torch.autograd.grad(loss, output)
    mse_grad = 2 * (output[:, :1] - noise).detach() / (16 * 4)  # d mean((pred - ε)²) / d pred
    torch.testing.assert_close(grad[:, :1], mse_grad)  # the vlb adds nothing to the mean's gradient
    assert float(grad[:, 1:].abs().sum()) > 0 and metrics["vlb"] > 0


def test_the_decoder_nll_at_t0_is_finite_bits_per_dimension():
    schedule = NoiseSchedule(ScheduleConfig(timesteps=50))
    x0 = (torch.randint(0, 256, (2, 1, 4, 4)).float() / 255) * 2 - 1  # (B, C, H, W) on the 256-level grid
    noise = _randn(x0.shape, 1)
    t = torch.zeros(2, dtype=torch.long)
    x_t = schedule.add_noise(x0, noise, t)
    bits = vlb_terms(schedule, torch.cat([noise, torch.zeros_like(noise)], dim=1), x0, x_t, t)  # (B,)
    assert torch.isfinite(bits).all() and (bits > 0).all() and (bits < 8).all()


def test_bad_input_is_refused_naming_expected_and_given():
    schedule = NoiseSchedule(ScheduleConfig(timesteps=100))
    with pytest.raises(ValueError, match=r"at most the trained T=100; got 101"):
        make_sampler(schedule, name="ddim", steps=101)
    with pytest.raises(ValueError, match=r"steps"):
        SamplerConfig(steps=-1)
    with pytest.raises(ValueError, match=r"beyond T - 1 = 99"):
        make_sampler(schedule, name="ddim", steps=10, steps_offset=10)
    with pytest.raises(ValueError, match=r"sampler name must be one of .*'ddim'.*got 'euler'"):
        make_sampler(schedule, name="euler")
    sampler = make_sampler(schedule, name="ddpm", steps=10)
    x = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match=r"\[0, 100\); got 100"):
        sampler.step(x, 100, x)
    with pytest.raises(ValueError, match=r"not one of this sampler's 10 respaced timesteps"):
        sampler.step(x, 11, x)
    with pytest.raises(ValueError, match=r"shape \(1, 1, 4, 4\).*got \(1, 3, 4, 4\)"):
        sampler.step(torch.zeros(1, 3, 4, 4), 90, x)
    with pytest.raises(ValueError, match=r"2C = 2 channels; got 1"):
        make_sampler(schedule, variance="learned_range").step(x, 5, x)
    with pytest.raises(ValueError, match=r"\[0, 100\).*max 100"):
        schedule.add_noise(x, x, torch.tensor([100]))
    with pytest.raises(ValueError, match=r"integers.*float"):
        schedule.add_noise(x, x, torch.tensor([1.5]))
    with pytest.raises(ValueError, match=r"weighting must be one of .*got 'snr'"):
        schedule.loss_weight(torch.tensor([1]), "snr")
    with pytest.raises(ValueError, match=r"kind"):
        ScheduleConfig(kind="cosine")
    with pytest.raises(ValueError, match=r"shape \(1, 2, 4, 4\).*got \(1, 1, 4, 4\)"):
        diffusion_loss(schedule, lambda x_t, t: x_t, x, learned_variance=True)
    assert math.isfinite(float(diffusion_loss(schedule, lambda x_t, t: x_t, x)[0]))

"""Guidance (classifier-free, classifier) and the sampling loop (RePaint, outpainting, DDIM inversion).

Analytic model functions stand in for trained networks where the exact answer is known: for Gaussian
data N(μ, Σ) the optimal noise estimate is E[ε | x_t] = sqrt(1 − ᾱ) C⁻¹ (x_t − sqrt(ᾱ) μ) with
C = ᾱ Σ + (1 − ᾱ) I, so guidance, inpainting and inversion can be checked against the truth.
"""

from __future__ import annotations

import pytest
import torch

from polymodal.diffusion.guidance import (
    cfg_model,
    classifier_free,
    classifier_guided,
    combine_guidance,
    reconstruction_guided,
)
from polymodal.diffusion.loop import outpaint_canvas, reconstruct, repaint_schedule, sample
from polymodal.diffusion.samplers import SamplerConfig, make_sampler
from polymodal.diffusion.schedule import NoiseSchedule, ScheduleConfig


def schedule(T: int = 1000, kind: str = "linear", prediction: str = "epsilon") -> NoiseSchedule:
    """A noise schedule (DDPM's linear one by default)."""
    return NoiseSchedule(ScheduleConfig(kind=kind, timesteps=T, prediction=prediction))


def ab_at(sched: NoiseSchedule, t: torch.Tensor) -> torch.Tensor:
    """ᾱ_t as float64 (B, 1, 1, 1)."""
    return sched.alphas_cumprod.double()[t.long()].view(-1, 1, 1, 1)


def gaussian_eps(sched: NoiseSchedule, mu: torch.Tensor, cov: torch.Tensor):
    """The exact ε-prediction for data x ~ N(mu, cov) on flattened (C·H·W) pixels."""

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b, d = x.shape[0], mu.numel()
        ab = sched.alphas_cumprod.double()[t.long()]  # (B,)
        xf = x.double().reshape(b, d)  # (B, D)
        eye = torch.eye(d, dtype=torch.float64)
        c = ab[:, None, None] * cov + (1 - ab)[:, None, None] * eye  # (B, D, D)
        r = xf - ab.sqrt()[:, None] * mu.reshape(1, d)  # (B, D)
        eps = (1 - ab).sqrt()[:, None] * torch.linalg.solve(c, r)  # (B, D)
        return eps.reshape(x.shape).to(x.dtype)

    return fn


# --- classifier-free guidance -------------------------------------------------------------------------------


class CountingModel:
    """A conditional model_fn(x, t, cond) whose output depends on the label and context; counts its calls."""

    def __init__(self, channels_out: int | None = None):
        self.calls: list[int] = []
        self.channels_out = channels_out

    def __call__(self, x, t, cond):
        self.calls.append(x.shape[0])
        lab = cond["label"].double().view(-1, 1, 1, 1)
        ctx = (cond["context"] * cond["context_mask"][..., None]).sum((1, 2)).view(-1, 1, 1, 1)
        out = torch.sin(x * (1 + lab)) + 0.1 * ctx + 0.001 * t.view(-1, 1, 1, 1)  # (B, C, H, W)
        if self.channels_out is not None:
            out = torch.cat([out, -out * 2], dim=1)[:, : self.channels_out]
        return out


def conds(b: int):
    """A batch of conditions and a batch-1 null condition (labels, context, its mask)."""
    g = torch.Generator().manual_seed(0)
    cond = {
        "label": torch.arange(b) % 10,
        "context": torch.randn(b, 3, 4, generator=g),
        "context_mask": torch.ones(b, 3, dtype=torch.bool),
    }
    null = {
        "label": torch.full((1,), 10),
        "context": torch.zeros(1, 3, 4),
        "context_mask": torch.zeros(1, 3, dtype=torch.bool),
    }
    return cond, null


def test_cfg_runs_one_batched_call_and_mixes_outputs():
    model = CountingModel()
    cond, null = conds(3)
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    t = torch.tensor([5, 6, 7])
    out = cfg_model(model, cond, null, 3.0)(x, t)
    assert model.calls == [6]  # one call on the doubled batch
    null_b = {k: v.expand(3, *v.shape[1:]) for k, v in null.items()}
    out_c, out_u = model(x, t, cond), model(x, t, null_b)
    torch.testing.assert_close(out, out_u + 3.0 * (out_c - out_u), rtol=0, atol=1e-12)


def test_cfg_scale_one_is_conditional_and_zero_unconditional():
    cond, null = conds(2)
    x, t = torch.randn(2, 1, 4, 4), torch.tensor([3, 9])
    model = CountingModel()
    assert torch.equal(cfg_model(model, cond, null, 1.0)(x, t), model(x, t, cond))
    null_b = {k: v.expand(2, *v.shape[1:]) for k, v in null.items()}
    assert torch.equal(cfg_model(model, cond, null, 0.0)(x, t), model(x, t, null_b))
    assert model.calls == [2, 2, 2, 2]  # no doubled batch at scale 0 or 1
    a, b = torch.randn(2, 3), torch.randn(2, 3)
    assert torch.equal(combine_guidance(a, b, 1.0), a) and torch.equal(combine_guidance(a, b, 0.0), b)


def test_cfg_guides_only_the_mean_half_of_a_learned_variance_output():
    model = CountingModel(channels_out=4)  # 2 × 2 channels: ε then the variance interpolation
    cond, null = conds(2)
    x, t = torch.randn(2, 2, 4, 4, dtype=torch.float64), torch.tensor([1, 2])
    out = cfg_model(model, cond, null, 4.0)(x, t)
    null_b = {k: v.expand(2, *v.shape[1:]) for k, v in null.items()}
    out_c, out_u = model(x, t, cond), model(x, t, null_b)
    torch.testing.assert_close(out[:, :2], out_u[:, :2] + 4.0 * (out_c[:, :2] - out_u[:, :2]), rtol=0, atol=1e-12)
    assert torch.equal(out[:, 2:], out_c[:, 2:])


def test_cfg_refuses_mismatched_conditions():
    cond, null = conds(2)
    x, t = torch.randn(2, 1, 4, 4), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="same inputs"):
        cfg_model(CountingModel(), cond, {"label": null["label"]}, 2.0)
    bad = dict(null, context=torch.zeros(1, 5, 4))
    with pytest.raises(ValueError, match=r"expected shape \(3, 4\).*got \(5, 4\)"):
        cfg_model(CountingModel(), cond, bad, 2.0)(x, t)
    with pytest.raises(ValueError, match="batch 2 or 1"):
        classifier_free(CountingModel(), 2.0)(x, t, cond, dict(null, label=torch.full((3,), 10)))
    with pytest.raises(ValueError, match="finite"):
        cfg_model(CountingModel(), cond, null, float("nan"))


# --- classifier guidance ------------------------------------------------------------------------------------


class LinearClassifier(torch.nn.Module):
    """logits = W · flatten(x) + b, ignoring t: its ∇ₓ log p(y|x) = W_y − Σ_k p_k W_k is known in closed form."""

    def __init__(self, d: int, k: int):
        super().__init__()
        self.lin = torch.nn.Linear(d, k)

    def forward(self, x, t):
        return self.lin(x.flatten(1))


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
def test_classifier_guidance_shifts_eps_by_the_scaled_log_prob_gradient(prediction):
    torch.manual_seed(0)
    sched = schedule(prediction=prediction)
    clf = LinearClassifier(16, 3)
    x, t, y = torch.randn(4, 1, 4, 4), torch.tensor([10, 200, 500, 900]), torch.tensor([0, 1, 2, 1])
    base = lambda x_, t_: torch.tanh(x_) * 0.5  # noqa: E731  any model output, in the schedule's prediction type
    guided = classifier_guided(base, sched, clf, y, scale=2.5)
    with torch.no_grad():  # sampling runs in no_grad: the gradient must still be taken
        out = guided(x, t)
    eps0, eps1 = sched.to_eps(base(x, t), x, t), sched.to_eps(out, x, t)
    with torch.no_grad():
        p = clf(x, t).softmax(-1)  # (B, K)
        w = clf.lin.weight  # (K, D)
        grad = (w[y] - p @ w).view_as(x)  # ∇ₓ log p(y | x)
    sigma = (1 - ab_at(sched, t)).sqrt().float()
    torch.testing.assert_close(eps0 - eps1, sigma * 2.5 * grad, rtol=1e-4, atol=1e-5)
    assert clf.lin.weight.grad is None  # the classifier itself gets no gradient
    # moving x against the guided noise (towards the guided x0) raises log p(y | x)
    step = 1e-2 * (eps0 - eps1)
    with torch.no_grad():
        before = clf(x, t).log_softmax(-1).gather(1, y[:, None])
        after = clf(x + step, t).log_softmax(-1).gather(1, y[:, None])
    assert bool((after > before).all())


def test_classifier_guidance_leaves_a_learned_variance_half_alone():
    sched = schedule()
    clf = LinearClassifier(16, 2)
    x, t, y = torch.randn(2, 1, 4, 4), torch.tensor([100, 700]), torch.tensor([1, 0])
    base = lambda x_, t_: torch.cat([x_ * 0.5, x_ * 0 + 0.25], dim=1)  # noqa: E731  (B, 2C, H, W): ε, variance
    out = classifier_guided(base, sched, clf, y, scale=3.0)(x, t)
    assert out.shape == (2, 2, 4, 4) and torch.equal(out[:, 1:], base(x, t)[:, 1:])
    assert not torch.allclose(out[:, :1], base(x, t)[:, :1])


def test_classifier_guidance_scale_zero_is_the_model_itself():
    sched = schedule()
    base = lambda x_, t_: x_ * 0.3  # noqa: E731
    assert classifier_guided(base, sched, LinearClassifier(4, 2), torch.tensor([1]), 0.0) is base
    with pytest.raises(ValueError, match=r"labels must be an integer tensor of shape \(B,\)"):
        classifier_guided(base, sched, LinearClassifier(4, 2), torch.tensor([[1]]), 1.0)


def test_classifier_guidance_samples_the_chosen_component_of_a_mixture():
    """Data: ±m with equal odds (a tight mixture). With the exact noisy posterior p(y | x_t) as the classifier,
    guidance at scale 1 turns the unconditional model into the class-conditional one."""
    sched = schedule()
    d, s2 = 4, 0.01
    m = torch.tensor([1.0, -0.5, 0.5, 0.8], dtype=torch.float64)

    def posterior_logits(x, t):  # log N(x_t; ±sqrt(ab) m, ab s2 + 1 - ab) up to a shared constant
        ab = sched.alphas_cumprod.double()[t.long()][:, None]  # (B, 1)
        var = ab * s2 + 1 - ab
        xf = x.double().reshape(x.shape[0], d)
        lp = [-((xf - sgn * ab.sqrt() * m) ** 2).sum(1) / (2 * var[:, 0]) for sgn in (1.0, -1.0)]
        return torch.stack(lp, 1).to(x.dtype)  # (B, 2)

    def uncond_eps(x, t):  # E[ε | x_t] for the two-component mixture
        ab = sched.alphas_cumprod.double()[t.long()].view(-1, 1, 1, 1)
        var = ab * s2 + 1 - ab
        w = posterior_logits(x, t).double().softmax(-1)  # (B, 2)
        mean_x0 = (w[:, 0] - w[:, 1]).view(-1, 1, 1, 1) * m.view(1, 1, 2, 2)  # E[sign] · m
        eps = (1 - ab).sqrt() * (x.double() - ab.sqrt() * mean_x0) / var  # exact within each component
        return eps.to(x.dtype)

    sampler = make_sampler(sched, SamplerConfig(name="ddim", steps=50, clip_sample=False))
    g = torch.Generator().manual_seed(1)
    labels = torch.zeros(200, dtype=torch.long)  # want +m
    guided = classifier_guided(uncond_eps, sched, posterior_logits, labels, 1.0)
    xs = sample(guided, sampler, (200, 1, 2, 2), generator=g, dtype=torch.float64).images
    plain = sample(uncond_eps, sampler, (200, 1, 2, 2), generator=g, dtype=torch.float64).images
    proj = lambda v: v.reshape(200, d) @ m  # noqa: E731
    assert float((proj(xs) > 0).double().mean()) >= 0.97
    assert 0.3 <= float((proj(plain) > 0).double().mean()) <= 0.7  # unguided: both components


# --- the loop: plain sampling, trajectories, bad input --------------------------------------------------------


def test_sample_is_reproducible_and_captures_a_trajectory():
    sched = schedule(T=100)
    model = gaussian_eps(sched, torch.zeros(4, dtype=torch.float64), torch.eye(4, dtype=torch.float64) * 0.2)
    sampler = make_sampler(sched, SamplerConfig(name="ddpm"))
    a = sample(model, sampler, (3, 1, 2, 2), generator=torch.Generator().manual_seed(7), trajectory_every=25)
    b = sample(model, sampler, (3, 1, 2, 2), generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.images, b.images) and a.model_calls == 100
    assert a.trajectory.shape == (5, 3, 1, 2, 2)  # x_t at calls 0, 25, 50, 75, then x_0
    assert a.trajectory_timesteps == [99, 74, 49, 24, -1]
    assert torch.equal(a.trajectory[-1], a.images)
    assert float(a.trajectory[0].std()) > 2 * float(a.images.std())  # noise first, data (std ≈ 0.45) last


def test_sample_refuses_bad_input():
    sched = schedule(T=50)
    sampler = make_sampler(sched, SamplerConfig(name="ddim", steps=10))
    model = lambda x, t: x * 0  # noqa: E731
    with pytest.raises(ValueError, match="steps"):
        make_sampler(sched, SamplerConfig(name="ddim", steps=-1))
    with pytest.raises(ValueError, match="51|50"):
        make_sampler(sched, SamplerConfig(name="ddim", steps=51))
    with pytest.raises(ValueError, match=r"mask.*\(1, 1, 4, 4\).*image \(2, 1, 8, 8\)"):
        sample(
            model, sampler, (2, 1, 8, 8), known=torch.zeros(2, 1, 8, 8), mask=torch.ones(1, 1, 4, 4, dtype=torch.bool)
        )
    with pytest.raises(
        ValueError, match=r"known image must have the sample's shape \(2, 1, 8, 8\); got \(2, 1, 4, 4\)"
    ):
        sample(
            model, sampler, (2, 1, 8, 8), known=torch.zeros(2, 1, 4, 4), mask=torch.ones(2, 1, 4, 4, dtype=torch.bool)
        )
    with pytest.raises(ValueError, match="only 0 and 1"):
        sample(model, sampler, (1, 1, 8, 8), known=torch.zeros(1, 1, 8, 8), mask=torch.full((1, 1, 8, 8), 0.5))
    with pytest.raises(ValueError, match="trajectory_every must be an integer ≥ 0; got -2"):
        sample(model, sampler, (1, 1, 8, 8), trajectory_every=-2)
    with pytest.raises(ValueError, match="both known and mask"):
        sample(model, sampler, (2, 1, 8, 8), known=torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="without them"):
        sample(model, sampler, (2, 1, 8, 8), resample=3)
    with pytest.raises(ValueError, match=r"shape \(2, 1, 8, 8\), x_T \(2, 1, 4, 4\)"):
        sample(model, sampler, (2, 1, 8, 8), x_T=torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match="resample must be an integer ≥ 1; got 0"):
        repaint_schedule(10, resample=0)


# --- RePaint inpainting -----------------------------------------------------------------------------------


def _compress_ups(labels: list[int]) -> list[int]:
    """diffusers lists a RePaint jump one level at a time; keep only where each ascending run ends."""
    out = []
    for i, v in enumerate(labels):
        going_up = i > 0 and v > labels[i - 1]
        if going_up and i + 1 < len(labels) and labels[i + 1] > v:
            continue
        out.append(v)
    return out


@pytest.mark.parametrize(("steps", "resample", "jump"), [(20, 1, 1), (20, 3, 1), (25, 4, 5), (30, 10, 10), (12, 2, 3)])
def test_repaint_walk_is_diffusers_and_the_papers(steps, resample, jump):
    from diffusers import RePaintScheduler

    ref = RePaintScheduler(num_train_timesteps=steps)
    ref.set_timesteps(steps, jump_length=jump, jump_n_sample=resample)
    # diffusers' label ℓ is "x at level ℓ + 1, about to be denoised": its list starts at x_T and ends before x_0
    want = [label + 1 for label in _compress_ups(ref.timesteps.tolist())[1:]] + [0]
    assert repaint_schedule(steps, resample, jump) == want


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
def test_repaint_keeps_the_known_pixels_and_resamples_each_step(name):
    sched = schedule(T=200)
    d = 16
    v = torch.linspace(-1, 1, d, dtype=torch.float64)
    cov = torch.outer(v, v) * 0.5 + torch.eye(d, dtype=torch.float64) * 0.01
    calls = []
    base = gaussian_eps(sched, torch.zeros(d, dtype=torch.float64), cov)

    def model(x, t):
        calls.append(int(t[0]))
        return base(x, t)

    sampler = make_sampler(sched, SamplerConfig(name=name, steps=20, clip_sample=False))
    g = torch.Generator().manual_seed(3)
    known = (torch.randn(4, 1, generator=g, dtype=torch.float64) * 0.7 * v).view(4, 1, 4, 4)
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    mask[..., :2, :] = True  # the top half known
    out = sample(model, sampler, (4, 1, 4, 4), generator=g, known=known, mask=mask, resample=3, dtype=torch.float64)
    assert torch.equal(out.images[..., :2, :], known[..., :2, :])
    assert out.model_calls == len(calls) == 20 + 19 * 2  # every step but the last repeated r = 3 times
    assert calls[:3] == [int(sampler.timesteps[0])] * 3 and calls[-1] == int(sampler.timesteps[-1])


def test_repaint_inpaints_a_correlated_gaussian_close_to_its_conditional_mean():
    """x = a·v + small noise: the known half fixes a, so the unknown half must follow."""
    sched = schedule(T=250)
    d = 16
    v = torch.linspace(-1, 1, d, dtype=torch.float64).roll(3)
    cov = torch.outer(v, v) + torch.eye(d, dtype=torch.float64) * 1e-3
    model = gaussian_eps(sched, torch.zeros(d, dtype=torch.float64), cov)
    g = torch.Generator().manual_seed(5)
    n = 64
    truth = (torch.randn(n, 1, generator=g, dtype=torch.float64) * v).view(n, 1, 4, 4)
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    mask[..., :2, :] = True
    sampler = make_sampler(sched, SamplerConfig(name="ddpm", steps=50, clip_sample=False))
    free = sample(model, sampler, (n, 1, 4, 4), generator=g, dtype=torch.float64).images
    err_free = float(((free - truth)[..., 2:, :] ** 2).mean())
    for r, j in ((1, 1), (5, 1), (4, 5)):
        out = sample(
            model, sampler, (n, 1, 4, 4), generator=g, known=truth, mask=mask, resample=r, jump=j, dtype=torch.float64
        )
        assert float(((out.images - truth)[..., 2:, :] ** 2).mean()) < 0.01 * err_free  # the known half steers


class ExactGaussianSampler:
    """A stand-in sampler that draws x_t' ~ q(x_t' | x_t) exactly for pixels i.i.d. N(0, var) (ignoring the model):
    every step then keeps the data's marginals, so any error in RePaint's re-noising shows in the samples."""

    def __init__(self, sched: NoiseSchedule, timesteps: list[int], var: float):
        self.schedule, self.var = sched, var
        self.timesteps = torch.tensor(timesteps)
        self.next = dict(zip(timesteps, [*timesteps[1:], -1]))

    def previous(self, t):
        return self.next[t]

    def step(self, output, t, x, generator=None):
        ac = self.schedule.alphas_cumprod.double()
        ab, ab_prev = ac[t], (ac[self.next[t]] if self.next[t] >= 0 else torch.tensor(1.0, dtype=torch.float64))
        v, v_prev, r = ab * self.var + 1 - ab, ab_prev * self.var + 1 - ab_prev, ab / ab_prev
        mean = r.sqrt() * v_prev / v * x
        std = (v_prev - r * v_prev**2 / v).sqrt()
        prev = mean + std * torch.randn(x.shape, generator=generator, dtype=x.dtype)

        class Out:
            pass

        out = Out()
        out.prev, out.x0 = prev, None
        return out


@pytest.mark.parametrize(("resample", "jump"), [(1, 1), (5, 1), (3, 4), (10, 10)])
def test_repaint_resampling_keeps_the_data_distribution(resample, jump):
    """With nothing known, RePaint's back-and-forth must still sample the data: its re-noising is q(x_t | x_t')."""
    sched = schedule()
    sampler = ExactGaussianSampler(sched, list(range(999, -1, -37)), var=0.3)  # x_T ~ N(0, 1) at t = 999
    n = 20000
    out = sample(
        lambda x, t: x,
        sampler,
        (n, 1, 2, 2),
        generator=torch.Generator().manual_seed(2),
        known=torch.zeros(n, 1, 2, 2, dtype=torch.float64),
        mask=torch.zeros(1, 1, 2, 2, dtype=torch.bool),
        resample=resample,
        jump=jump,
        dtype=torch.float64,
    )
    assert out.model_calls > 20 or resample == 1
    var = out.images.reshape(-1).var()
    assert abs(float(var) - 0.3) < 0.01  # sampling error ≈ 0.0015


def test_outpaint_canvas():
    img = torch.rand(2, 3, 8, 8) * 2 - 1
    known, mask = outpaint_canvas(img, 2)
    assert known.shape == (2, 3, 12, 12) and mask.shape == (2, 1, 12, 12)
    assert torch.equal(known[:, :, 2:10, 2:10], img) and int(mask.sum()) == 2 * 64
    assert not bool(mask[:, :, :2].any()) and not bool(mask[:, :, :, 10:].any())
    small, m2 = outpaint_canvas(img, 2, keep_size=True)
    assert small.shape == img.shape and int(m2[0].sum()) == 16
    torch.testing.assert_close(small[:, :, 2:6, 2:6], torch.nn.functional.avg_pool2d(img, 2))
    with pytest.raises(ValueError, match="at most 3.*got 4"):
        outpaint_canvas(img, 4, keep_size=True)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        outpaint_canvas(img[0], 2)


# --- DDIM inversion and a whole DDIM loop against diffusers ----------------------------------------------------


def test_ddim_inversion_round_trip_on_an_analytic_model():
    from polymodal.diffusion.loop import invert

    sched = schedule()
    d = 16
    g = torch.Generator().manual_seed(11)
    a = torch.randn(d, d, generator=g, dtype=torch.float64) * 0.2
    mu = torch.randn(d, generator=g, dtype=torch.float64) * 0.3
    model = gaussian_eps(sched, mu, a @ a.T + 0.05 * torch.eye(d, dtype=torch.float64))
    x0 = (mu + torch.randn(8, d, generator=g, dtype=torch.float64) @ a.T).view(8, 1, 4, 4)
    errors = {}
    for steps, refine in ((50, 0), (200, 0), (50, 1)):
        sampler = make_sampler(sched, SamplerConfig(name="ddim", steps=steps, clip_sample=False))
        x_T = invert(model, sampler, x0, refine=refine)
        assert float(x_T.std()) > 0.8  # noise-like, not x0 again
        errors[steps, refine] = float(((reconstruct(model, sampler, x_T) - x0) ** 2).mean())
    assert errors[200, 0] <= 1e-3 < errors[50, 0]  # plain inversion: exact only with many steps
    assert errors[50, 1] <= 1e-4  # one fixed-point refinement per step closes the gap at 50 steps
    with pytest.raises(ValueError, match="refine must be an integer ≥ 0; got -1"):
        invert(model, sampler, x0, refine=-1)


def test_whole_ddim_loop_equals_diffusers_with_the_same_unet():
    from diffusers import DDIMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=8,
    ).eval()
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = DDIMScheduler(num_train_timesteps=1000, clip_sample=True)
    ref.set_timesteps(50)
    want = x_T.clone()
    with torch.no_grad():
        for t in ref.timesteps:
            want = ref.step(unet(want, t).sample, t, want, eta=0.0).prev_sample
        sampler = make_sampler(schedule(), SamplerConfig(name="ddim", steps=50))
        got = sample(lambda x, t: unet(x, t).sample, sampler, x_T=x_T).images
    assert torch.equal(torch.as_tensor(sampler.timesteps), ref.timesteps)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_reconstruction_guidance_pulls_the_predicted_x0_towards_the_known_pixels(prediction):
    """A linear stand-in model: one guided call moves x̂0 on the known pixels by about −scale · ∂L/∂x̂0,
    the unknown pixels follow only through the model, and scale 0 is the model itself."""
    sched = schedule(prediction=prediction)
    torch.manual_seed(0)
    mix = torch.randn(16, 16) * 0.1 + torch.eye(16)  # a linear model couples every pixel

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps = (x.reshape(x.shape[0], 16) @ mix).reshape(x.shape) * 0.5  # (B, 1, 4, 4)
        return sched.from_eps(eps, x, t)

    known = torch.rand(3, 1, 4, 4) * 2 - 1  # (3, 1, 4, 4)
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    mask[..., :2, :] = True
    x = torch.randn(3, 1, 4, 4)
    t = torch.tensor([100, 400, 800])
    assert reconstruction_guided(model, sched, known, mask, 0.0) is model
    before = sched.to_x0(model(x, t), x, t)
    err = lambda x0: ((x0 - known) ** 2 * mask).sum(dim=(1, 2, 3))  # noqa: E731
    for scale in (0.05, 0.2):
        after = sched.to_x0(reconstruction_guided(model, sched, known, mask, scale)(x, t), x, t)
        assert (err(after) < err(before)).all(), (scale, err(before), err(after))
    with torch.no_grad():  # the gradient is taken even when the caller samples without one
        out = reconstruction_guided(model, sched, known, mask, 0.1)(x, t)
    assert out.shape == x.shape and not out.requires_grad
    with pytest.raises(ValueError, match="finite"):
        reconstruction_guided(model, sched, known, mask, float("nan"))

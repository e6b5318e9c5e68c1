"""VQ-VAE: the tokenizer contract, the EMA codebook's math, straight-through gradients, init and
dead-code reset, input checks, save/load and exact resume, registration. Fast (tiny models)."""

from __future__ import annotations

import attrs
import pytest
import torch

import polymodal
from polymodal.data import load_digits
from polymodal.nn.quantize import EMACodebook, kmeans, nearest
from polymodal.plugins.vqvae import VARIANTS, VQVAE, VQVAEConfig
from polymodal.registry import get_registry
from polymodal.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(hidden=16, res_blocks=1, res_hidden=8, dim=8)


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def tiny(name: str = "vqvae", **overrides) -> VQVAE:
    """A small, freshly initialised model of a registered variant."""
    torch.manual_seed(0)
    return VQVAE(attrs.evolve(VARIANTS[name].config, **{**TINY, **overrides}))


def codebook(embed: list[list[float]], *, decay: float = 0.99, eps: float = 0.0, dead: int = 0) -> EMACodebook:
    """An initialised codebook holding ``embed`` with counts of one each."""
    cb = EMACodebook(len(embed), len(embed[0]), decay=decay, eps=eps, dead_code_steps=dead)
    with torch.no_grad():
        cb.embed.copy_(torch.tensor(embed))
        cb.embed_sum.copy_(cb.embed)
        cb.initted.fill_(True)
    return cb.train()


# -- the tokenizer contract -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,channels,size,grid,k", [("vqvae", 1, 8, (4, 4), 64), ("vqvae-shapes", 3, 32, (8, 8), 128)]
)
def test_encode_decode_shapes(name, channels, size, grid, k):
    model = tiny(name).eval()
    images = torch.rand(5, channels, size, size)
    codes = model.encode(images)
    assert codes.shape == (5, *grid) and codes.dtype == torch.long
    assert model.grid == grid and model.codebook_size == k == model.vocab_size
    assert int(codes.min()) >= 0 and int(codes.max()) < k
    out = model.decode(codes)
    assert out.shape == (5, channels, size, size) and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    every = torch.arange(k).repeat(grid[0] * grid[1] // k + 1)[: grid[0] * grid[1]].view(1, *grid)
    assert model.decode(every).shape == (1, channels, size, size)  # any valid id decodes


def test_encode_picks_the_nearest_code_and_decode_uses_it():
    model = tiny().eval()
    images = torch.rand(3, 1, 8, 8)
    z = model.encoder(images).permute(0, 2, 3, 1).reshape(-1, model.config.dim)  # (3·16, D)
    dist = torch.cdist(z, model.codebook.embed)  # (48, K)
    assert torch.equal(model.encode(images).flatten(), dist.argmin(1))
    latents = model.codebook.embed[model.encode(images)].permute(0, 3, 1, 2)  # (3, D, 4, 4)
    torch.testing.assert_close(model.decode(model.encode(images)), model.decoder(latents).clamp(0, 1))
    torch.testing.assert_close(model(images), model.decode(model.encode(images)))


def test_bad_inputs_name_expected_and_given():
    model = tiny().eval()
    with pytest.raises(ValueError, match=r"expected images \(B, 1, 8, 8\); got \(2, 3, 8, 8\)"):
        model.encode(torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"expected images \(B, 1, 8, 8\); got \(2, 1, 16, 16\)"):
        model.encode(torch.rand(2, 1, 16, 16))
    with pytest.raises(ValueError, match=r"got \(1, 8, 8\)"):
        model.encode(torch.rand(1, 8, 8))
    with pytest.raises(ValueError, match="floating-point"):
        model.encode(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
    codes = torch.zeros(2, 4, 4, dtype=torch.long)
    for bad, given in ((64, "to 64"), (-1, "from -1")):
        codes[1, 2, 3] = bad
        with pytest.raises(ValueError, match=rf"\[0, 64\).*{given}"):
            model.decode(codes)
    with pytest.raises(ValueError, match=r"expected codes \(B, 4, 4\); got \(2, 8, 8\)"):
        model.decode(torch.zeros(2, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="integer code ids"):
        model.decode(torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="divisible by 2\\^stages"):
        VQVAEConfig(image_size=10, stages=2)


# -- the codebook ----------------------------------------------------------------------------------


def test_ema_update_moves_a_used_code_towards_its_outputs_with_decay_099():
    cb = codebook([[0.0, 0.0], [10.0, 10.0]])
    z = torch.tensor([[1.0, 1.0], [1.0, 3.0]])  # both nearest to code 0
    quantized, codes, _ = cb(z)
    assert codes.tolist() == [0, 0]
    torch.testing.assert_close(quantized, torch.zeros(2, 2))  # quantised with the codebook before the step
    # N_0 = 0.99·1 + 0.01·2 = 1.01; m_0 = 0.99·(0, 0) + 0.01·(2, 4) = (0.02, 0.04); e_0 = m_0 / N_0
    torch.testing.assert_close(cb.cluster_size, torch.tensor([1.01, 0.99]))
    torch.testing.assert_close(cb.embed_sum, torch.tensor([[0.02, 0.04], [9.9, 9.9]]))
    torch.testing.assert_close(cb.embed, torch.tensor([[0.02 / 1.01, 0.04 / 1.01], [10.0, 10.0]]))
    assert cb.idle.tolist() == [0, 1]
    # repeated steps converge to the mean of the assigned outputs, (1, 2)
    for _ in range(2000):
        cb(z)
    torch.testing.assert_close(cb.embed[0], torch.tensor([1.0, 2.0]), atol=1e-3, rtol=0)


def test_ema_update_matches_the_formula_with_laplace_smoothing():
    g = torch.Generator().manual_seed(1)
    cb = EMACodebook(6, 3, decay=0.99, eps=1e-5, dead_code_steps=0)
    with torch.no_grad():
        cb.embed.copy_(torch.randn(6, 3, generator=g))
        cb.embed_sum.copy_(cb.embed * 2.0)
        cb.cluster_size.fill_(2.0)
        cb.initted.fill_(True)
    z = torch.randn(40, 3, generator=g)
    before_sum, before_size = cb.embed_sum.clone(), cb.cluster_size.clone()
    assign = torch.cdist(z, cb.embed).argmin(1)
    onehot = torch.nn.functional.one_hot(assign, 6).float()  # (40, 6)
    size = 0.99 * before_size + 0.01 * onehot.sum(0)
    total = size.sum()
    smoothed = (size + 1e-5) / (total + 6 * 1e-5) * total
    expected = (0.99 * before_sum + 0.01 * onehot.t() @ z) / smoothed[:, None]
    cb.train()(z)
    torch.testing.assert_close(cb.cluster_size, size)
    torch.testing.assert_close(cb.embed, expected)


def test_eval_mode_never_touches_the_codebook():
    cb = codebook([[0.0, 0.0], [10.0, 10.0]], dead=1).eval()
    state = {k: v.clone() for k, v in cb.state_dict().items()}
    for _ in range(3):
        cb(torch.ones(4, 2))
    assert all(torch.equal(v, cb.state_dict()[k]) for k, v in state.items())


def test_straight_through_gradient_is_the_identity():
    cb = codebook([[0.0, 0.0], [10.0, 10.0]])
    z = torch.tensor([[1.0, 2.0], [9.0, 8.0]], requires_grad=True)
    quantized, _, commitment = cb(z)
    weights = torch.tensor([[3.0, -1.0], [0.5, 2.0]])
    (quantized * weights).sum().backward()
    torch.testing.assert_close(z.grad, weights)  # d(z_q)/d(z) = I
    z.grad = None
    commitment.backward()  # mean((z − sg[e])²): pulls z towards its code, never the code towards z
    codes_before = torch.tensor([[0.0, 0.0], [10.0, 10.0]])
    assert commitment.item() == pytest.approx(((z.detach() - codes_before) ** 2).mean().item())
    torch.testing.assert_close(z.grad, 2 * (z.detach() - codes_before) / z.numel())


def test_straight_through_gradient_reaches_the_encoder():
    model = tiny(commitment=0.0).train()  # no commitment term: the encoder learns only through the ST path
    loss, _ = model.loss({"image": torch.rand(4, 1, 8, 8)})
    loss.backward()
    grads = [p.grad for p in model.encoder.parameters()]
    assert all(g is not None for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    assert not any(p.requires_grad for p in model.codebook.buffers())  # the codebook moves by EMA only


def test_codebook_is_initialised_from_the_first_batch():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[5.0, 0.0], [-5.0, 0.0], [0.0, 5.0]])
    z = centres[torch.arange(90) % 3] + 0.1 * torch.randn(90, 2, generator=g)  # three tight clusters
    cb = EMACodebook(3, 2, kmeans_iters=0, dead_code_steps=0)
    assert not bool(cb.initted)
    cb.eval()(z)
    assert not bool(cb.initted)  # eval never initialises
    cb.train()
    with torch.no_grad():
        cb.init_from(z)
    assert bool(cb.initted)
    assert all(any(torch.equal(row, x) for x in z) for row in cb.embed)  # without k-means: batch rows
    torch.manual_seed(3)
    found = kmeans(z, 3, iters=10)
    order = nearest(centres, found)
    torch.testing.assert_close(found[order], centres, atol=0.1, rtol=0)  # k-means finds the cluster means
    fresh = EMACodebook(3, 2, kmeans_iters=10, dead_code_steps=0).train()
    before = fresh.embed.clone()
    fresh(z)  # the first training forward initialises (then takes one EMA step)
    assert bool(fresh.initted) and not torch.equal(fresh.embed, before)
    assert nearest(z, fresh.embed).unique().numel() == 3  # every code is used: none wasted on empty space


def test_dead_code_is_reseeded_from_current_encoder_outputs():
    cb = codebook([[0.0, 0.0], [100.0, 100.0], [-100.0, 50.0]], dead=3)
    z = torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.5, 0.5]])  # always code 0
    for step in range(2):
        cb(z)
        assert cb.idle.tolist() == [0, step + 1, step + 1]
        torch.testing.assert_close(cb.embed[1], torch.tensor([100.0, 100.0]))  # not yet dead
    cb(z)  # third step without use: codes 1 and 2 are re-seeded from this batch
    assert cb.idle.tolist() == [0, 0, 0]
    for k in (1, 2):
        assert any(torch.equal(cb.embed[k], x) for x in z), cb.embed[k]
        assert cb.cluster_size[k].item() == 1.0 and torch.equal(cb.embed_sum[k], cb.embed[k])


def test_dead_code_reset_off_keeps_unused_codes():
    cb = codebook([[0.0, 0.0], [100.0, 100.0]], dead=0)
    for _ in range(50):
        cb(torch.ones(3, 2))
    torch.testing.assert_close(cb.embed[1], torch.tensor([100.0, 100.0]))


# -- model folders, training, registration ---------------------------------------------------------


def test_loss_has_metrics_and_first_batch_initialises(digits):
    model = tiny().train()
    assert not bool(model.codebook.initted)
    loss, metrics = model.loss(digits.train.batch(list(range(16))))
    assert bool(model.codebook.initted) and torch.isfinite(loss)
    assert set(metrics) == {"recon_mse", "commitment", "codes_in_batch"}
    assert loss.item() == pytest.approx(float(metrics["recon_mse"] + 0.25 * metrics["commitment"]), rel=1e-5)


def test_save_load_gives_identical_codes(digits, tmp_path):
    model = tiny().train()
    for start in range(0, 64, 16):
        model.loss(digits.train.batch(list(range(start, start + 16))))  # EMA steps move the buffers
    model.eval()
    model.save(tmp_path / "vq")
    loaded = polymodal.load(tmp_path / "vq")
    images = digits.test["image"][:32]
    assert torch.equal(loaded.encode(images), model.encode(images))
    assert torch.equal(loaded.decode(model.encode(images)), model.decode(model.encode(images)))
    assert bool(loaded.codebook.initted) and torch.equal(loaded.codebook.idle, model.codebook.idle)
    assert loaded.config.data == "digits" and loaded.default_data == "digits"


def test_resume_reaches_the_same_codebook_and_weights(digits, tmp_path):
    spec = VARIANTS["vqvae"]
    cfg = attrs.evolve(
        spec.model_class.config_for_data(spec.config, digits), **TINY, dead_code_steps=2, codebook_size=64
    )
    run = TrainConfig(steps=8, batch_size=8, warmup_steps=2, checkpoint_every=3, log_every=1)

    def fresh(seed=0):
        torch.manual_seed(seed)
        return VQVAE(cfg)

    torch.manual_seed(5)
    straight = train(fresh(), digits, run, out=tmp_path / "a", progress=False)
    torch.manual_seed(5)
    train(fresh(), digits, run, out=tmp_path / "b", progress=False, stop_after=4)
    resumed = train(fresh(seed=9), digits, run, out=tmp_path / "b", progress=False, resume=True)
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and "codebook.cluster_size" in a and "codebook.idle" in a
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_evaluate_reports_reconstruction_and_codebook_use(digits):
    model = tiny().eval()
    metrics = model.evaluate(digits)
    assert set(metrics) >= {"recon_mse", "recon_mse_normalized", "codebook_perplexity", "codes_used"}
    variance = digits.test["image"].var(unbiased=False).item()
    assert metrics["recon_mse_normalized"] == pytest.approx(metrics["recon_mse"] / variance, rel=1e-6)
    codes = model.encode(digits.test["image"])
    p = torch.bincount(codes.flatten(), minlength=64).double() / codes.numel()
    assert metrics["codebook_perplexity"] == pytest.approx(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()).item())
    assert metrics["codes_used"] == int((p > 0).sum()) and 1 <= metrics["codebook_perplexity"] <= metrics["codes_used"]


def test_sample_to_folder_writes_reconstructions_and_rejects_options(tmp_path):
    model = tiny().eval()
    paths = model.sample_to_folder(tmp_path / "s", n=3, prompt=None, seed=1)
    names = sorted(p.name for p in paths)
    assert names == sorted(
        [
            "sample_000.png",
            "sample_001.png",
            "sample_002.png",
            "grid.png",
            "original_000.png",
            "original_001.png",
            "original_002.png",
            "pairs.png",
        ]
    )
    assert all(p.is_file() for p in paths)
    with pytest.raises(ValueError, match="temperature"):
        model.sample_to_folder(tmp_path / "t", n=2, prompt=None, seed=0, temperature=0.5)
    with pytest.raises(ValueError, match="prompt"):
        model.sample_to_folder(tmp_path / "t", n=2, prompt="the digit 3", seed=0)


def test_registered_names_and_variants():
    registry = get_registry()
    assert registry.get("tokenizer", "vqvae") is VQVAE
    digits_spec, shapes_spec = registry.get("model", "vqvae"), registry.get("model", "vqvae-shapes")
    assert (digits_spec.data, shapes_spec.data) == ("digits", "shapes")
    d, s = VQVAE(digits_spec.config), VQVAE(shapes_spec.config)
    assert (d.grid, d.codebook_size, d.config.channels) == ((4, 4), 64, 1)
    assert (s.grid, s.codebook_size, s.config.channels) == ((8, 8), 128, 3)
    assert (d.config.decay, d.config.commitment) == (0.99, 0.25)
    assert any("64-code" in line for line in d.card_lines())

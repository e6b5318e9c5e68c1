"""unCLIP's decoder: the CLIP projection against diffusers' UnCLIPTextProjModel, the UNet's additive
(identity) time embedding, condition dropouts, guidance, sampling, bad input and the model contracts."""

from __future__ import annotations

import attrs
import pytest
import torch

from polymodal.data import load_digits
from polymodal.nn import UNet
from polymodal.nn.conditioning import UnCLIPProjection
from polymodal.plugins.unclip.decoder import VARIANTS, DecoderConfig, UnCLIPDecoder
from polymodal.registry import get_registry
from polymodal.testing import contracts

pytestmark = pytest.mark.usefixtures("one_thread")
SPEC = VARIANTS["unclip-decoder"]


@pytest.fixture(scope="module")
def registered():
    """The variant is in the registry (the plugin's entry point): loading a folder finds the class by family."""
    assert ("model", "unclip-decoder") in get_registry()
    yield


def tiny(seed: int = 0, **changes) -> UnCLIPDecoder:
    torch.manual_seed(seed)
    cfg = attrs.evolve(UnCLIPDecoder.tiny_config(SPEC.config), **changes)
    model = UnCLIPDecoder(cfg)
    contracts._perturb(model, seed)  # the null embedding and every projection away from their init
    return model.eval()


# -- the projection is diffusers' UnCLIPTextProjModel -----------------------------------------------------


@pytest.mark.parametrize("embed,time,context,extra", [(32, 64, 48, 4), (16, 40, 24, 2)])
@pytest.mark.parametrize("doubled", [False, True], ids=["plain", "cfg-doubled"])
def test_projection_equals_diffusers_unclip_text_proj(embed, time, context, extra, doubled):
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

    torch.manual_seed(1)
    ref = UnCLIPTextProjModel(
        clip_extra_context_tokens=extra, clip_embeddings_dim=embed, time_embed_dim=time, cross_attention_dim=context
    ).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.5)
    mine = UnCLIPProjection(embed, embed, time, context, extra).eval()
    mine.load_state_dict(ref.state_dict(), strict=True)  # the same names, 1:1
    b, length = 3, 7
    g = torch.Generator().manual_seed(2)
    image = torch.randn(b, embed, generator=g)  # (B, E)
    tb = 2 * b if doubled else b
    text_embed = torch.randn(tb, embed, generator=g)  # (B', E)
    tokens = torch.randn(tb, length, embed, generator=g)  # (B', L, E)
    with torch.no_grad():
        want_ctx, want_add = ref(
            image_embeddings=image,
            prompt_embeds=text_embed,
            text_encoder_hidden_states=tokens,
            do_classifier_free_guidance=doubled,
        )
        got_ctx, got_add = mine(image, text_embed, tokens, prepend_null=doubled)
    assert got_ctx.shape == (tb, extra + length, context) and got_add.shape == (tb, time)
    torch.testing.assert_close(got_ctx, want_ctx, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_add, want_add, atol=1e-5, rtol=0)


# -- the UNet's additive (identity) time embedding ------------------------------------------------------


def test_unet_additive_embedding_is_optional_and_changes_nothing_by_default():
    unet_cfg = get_registry().get("model", "ddpm").config.unet  # what `polymodal train ddpm` builds
    torch.manual_seed(0)
    unet = UNet(unet_cfg).eval()
    torch.manual_seed(0)
    again = UNet(unet_cfg).eval()
    assert list(unet.state_dict()) == list(again.state_dict())
    assert not any("additive" in k for k in unet.state_dict())  # a per-call input: no weights, no config field
    x, t = unet.example_inputs(3, torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = again(x, t)
        assert torch.equal(unet(x, t, additive_embedding=None), plain)
        zero = unet(x, t, additive_embedding=torch.zeros(3, unet_cfg.time_dim))
        moved = unet(x, t, additive_embedding=torch.randn(3, unet_cfg.time_dim))
    torch.testing.assert_close(zero, plain, atol=1e-6, rtol=0)
    assert (moved - plain).abs().max() > 1e-3


def test_unet_additive_embedding_is_the_vector_path_with_an_identity_projection():
    cfg = attrs.evolve(get_registry().get("model", "ddpm").config.unet, embedding_dim=64)  # time_dim = 4 × 16
    torch.manual_seed(0)
    projected = UNet(cfg).eval()
    with torch.no_grad():
        projected.embedding_proj.weight.copy_(torch.eye(64))
        projected.embedding_proj.bias.zero_()
    plain = UNet(attrs.evolve(cfg, embedding_dim=0)).eval()
    plain.load_state_dict({k: v for k, v in projected.state_dict().items() if "embedding_proj" not in k})
    x, t = plain.example_inputs(2, torch.Generator().manual_seed(1))
    vec = torch.randn(2, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            plain(x, t, additive_embedding=vec), projected(x, t, embedding=vec), atol=1e-5, rtol=0
        )
    with pytest.raises(ValueError, match=r"additive_embedding must be \(B, time_dim\) = \(2, 64\).*got \(2, 63\)"):
        plain(x, t, additive_embedding=torch.zeros(2, 63))


# -- the decoder ----------------------------------------------------------------------------------------


def test_forward_shape_and_the_text_padding_mask_is_honoured():
    model = tiny()
    x, t, image, text, tokens, mask = model.example_inputs(3, torch.Generator().manual_seed(0))
    mask[:, 3:] = False
    with torch.no_grad():
        eps = model(x, t, image, text, tokens, mask)
        assert eps.shape == x.shape
        noisy = tokens.clone()
        noisy[:, 3:] += 5 * torch.randn_like(noisy[:, 3:])  # only padded tokens change
        torch.testing.assert_close(model(x, t, image, text, noisy, mask), eps, atol=1e-5, rtol=0)
        noisy[:, 0] += 1.0  # a real token changes: the output must too
        assert (model(x, t, image, text, noisy, mask) - eps).abs().max() > 1e-4
        # no text = a zero text embedding with every text token masked out
        none = model(x, t, image)
        dropped = model(x, t, image, torch.zeros_like(text), tokens, torch.zeros_like(mask))
        torch.testing.assert_close(none, dropped, atol=1e-5, rtol=0)
        assert (none - eps).abs().max() > 1e-4
        assert (model(x, t, torch.randn_like(image), text, tokens, mask) - eps).abs().max() > 1e-4


def test_loss_backward_and_the_dropouts_come_at_their_rates_independently():
    model = tiny().train()
    n = 4000
    batch = model.example_batch(n, torch.Generator().manual_seed(0))
    seen = {}
    original = model.forward

    def spy(x, t, image_embed, text_embed, text_tokens, text_mask):
        seen.update(image=image_embed.detach(), text=text_embed.detach(), mask=text_mask.detach())
        return original(x, t, image_embed, text_embed, text_tokens, text_mask)

    model.forward = spy
    torch.manual_seed(123)
    loss, metrics = model.loss(batch)
    loss.backward()
    assert model.text_proj.learned_classifier_free_guidance_embeddings.grad.abs().sum() > 0
    null = model.null_image_embed.detach()  # (1, E)
    img_dropped = (seen["image"] == null).all(dim=1)  # (B,)
    kept = ~img_dropped
    assert torch.equal(seen["image"][kept], batch["image_embed"][kept])
    txt_dropped = ~seen["mask"].any(dim=1)  # (B,): every token masked
    assert torch.equal(seen["text"][txt_dropped], torch.zeros_like(seen["text"][txt_dropped]))
    assert torch.equal(seen["mask"][~txt_dropped], batch["text_mask"][~txt_dropped])
    assert torch.equal(seen["text"][~txt_dropped], batch["text_embed"][~txt_dropped])
    sd = (0.25 / n) ** 0.5  # the largest binomial standard deviation of a share
    for share, rate in [(img_dropped, 0.1), (txt_dropped, 0.5), (img_dropped & txt_dropped, 0.05)]:
        assert abs(share.float().mean().item() - rate) < 4 * sd, (share.float().mean().item(), rate)
    assert float(metrics["image_dropped"]) == pytest.approx(img_dropped.float().mean().item())
    assert float(metrics["text_dropped"]) == pytest.approx(txt_dropped.float().mean().item())
    model.forward = original
    torch.manual_seed(5)
    model.eval()  # no dropouts outside training
    _, metrics = model.loss(model.example_batch(8, torch.Generator().manual_seed(1)))
    assert "image_dropped" not in metrics


@pytest.mark.parametrize("t", [3, 50, 97])
def test_min_snr_weighting_scales_each_sample_by_min_snr_gamma_over_snr(t):
    """loss_weighting='min_snr': the same draws (t, noise) give the plain ε MSE times min(SNR, 5)/SNR."""
    plain = tiny()
    weighted = UnCLIPDecoder(attrs.evolve(plain.config, loss_weighting="min_snr")).eval()
    weighted.load_state_dict(plain.state_dict())
    batch = plain.example_batch(1, torch.Generator().manual_seed(2))
    losses = []
    for model in (plain, weighted):
        torch.manual_seed(0)
        with pytest.MonkeyPatch.context() as mp:  # fix the drawn timestep, keep the drawn noise
            mp.setattr(torch, "randint", lambda low, high, size, **kw: torch.full(size, t))
            losses.append(model.loss(batch)[0])
    snr = plain.schedule.snr(torch.tensor([t]))
    assert float(losses[1]) == pytest.approx(float(losses[0] * snr.clamp(max=5.0) / snr), rel=1e-5)
    assert (float(snr) > 5) == (float(losses[1]) < float(losses[0]))  # only high-SNR (small t) steps are damped
    with pytest.raises(ValueError, match="loss_weighting"):
        DecoderConfig(loss_weighting="snr")


def test_guidance_scale_one_is_the_conditional_prediction_and_w_combines_the_two():
    model = tiny()
    x, t, image, text, tokens, mask = model.example_inputs(2, torch.Generator().manual_seed(3))
    with torch.no_grad():
        cond = model(x, t, image, text, tokens, mask)
        uncond = model(x, t, model.null_image_embed.expand_as(image), None, None, None)
        assert torch.equal(model.denoise_fn(image, text, tokens, mask, guidance_scale=1.0)(x, t), cond)
        guided = model.denoise_fn(image, text, tokens, mask, guidance_scale=4.0)(x, t)
        torch.testing.assert_close(guided, uncond + 4.0 * (cond - uncond), atol=1e-4, rtol=0)
        only_image = model(x, t, image)
        torch.testing.assert_close(model.denoise_fn(image, guidance_scale=1.0)(x, t), only_image, atol=0, rtol=0)


def test_sample_shapes_range_fixed_noise_and_image_only_variations():
    model = tiny()
    _, _, image, text, tokens, mask = model.example_inputs(2, torch.Generator().manual_seed(4))
    noise = torch.randn(2, *model.image_shape, generator=torch.Generator().manual_seed(5))
    a = model.sample(image, text, tokens, mask, steps=4, noise=noise, guidance_scale=2.0)
    b = model.sample(image, text, tokens, mask, steps=4, noise=noise, guidance_scale=2.0)
    assert a.shape == (2, *model.image_shape) and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b)  # DDIM η = 0 from a fixed x_T is deterministic
    other = model.sample(image, text, tokens, mask, steps=4, noise=-noise, guidance_scale=2.0)
    assert (other - a).abs().max() > 1e-3
    var = model.sample(image, steps=3, sampler="ddpm", generator=torch.Generator().manual_seed(0))
    assert var.shape == a.shape and torch.isfinite(var).all()


def test_bad_input_names_expected_and_given():
    model = tiny()
    x, t, image, text, tokens, mask = model.example_inputs(2)
    e, s = model.config.embed_dim, model.config.unet.sample_size
    with pytest.raises(ValueError, match=rf"image_embed must be \(B, E\) = \(2, {e}\); got \(2, {e + 1}\)"):
        model(x, t, torch.zeros(2, e + 1), text, tokens, mask)
    with pytest.raises(ValueError, match=rf"image_embed must be \(B, E\) = \(B, {e}\); got \(2, 3\)"):
        model.sample(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=rf"x_t must be .*= \(B, 1, {s}, {s}\); got \(2, 1, 16, 16\)"):
        model(torch.zeros(2, 1, 16, 16), t, image, text, tokens, mask)
    batch = model.example_batch(2)
    batch["image"] = torch.rand(2, 3, s, s)
    with pytest.raises(ValueError, match=rf"batch\['image'\] must be .*= \(B, 1, {s}, {s}\); got \(2, 3, {s}, {s}\)"):
        model.loss(batch)
    with pytest.raises(ValueError, match=r"text_tokens must be \(B, L, Dt\) = \(2, L, 24\); got \(2, 6, 15\)"):
        model(x, t, image, text, tokens[..., :15], mask)
    with pytest.raises(ValueError, match=r"text_mask must be \(B, L\) = \(2, 6\); got \(2, 5\)"):
        model(x, t, image, text, tokens, mask[:, :5])
    with pytest.raises(ValueError, match="text_embed and text_tokens together"):
        model(x, t, image, text, None, None)
    with pytest.raises(ValueError, match=r"noise \(x_T\) must have shape \(2, 1, 8, 8\); got \(2, 1, 4, 4\)"):
        model.sample(image, noise=torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match=r"steps must be an integer in 1 … 100"):
        model.sample(image, steps=101)
    with pytest.raises(ValueError, match=r"unet.context_dim must be ≥ 1"):
        DecoderConfig(unet=attrs.evolve(SPEC.config.unet, context_dim=0))


def test_the_decoder_alone_does_not_train_on_images():
    digits = load_digits()
    with pytest.raises(ValueError, match="polymodal train unclip"):
        SPEC.config_for(digits)
    model = tiny().train()
    with pytest.raises(
        ValueError, match=r"missing image_embed, text_embed, text_tokens, text_mask.*polymodal train unclip"
    ):
        model.loss(digits.train.batch([0, 1]))


def test_the_shapes_configuration_is_set_through_config():
    small = UnCLIPDecoder.tiny_config(SPEC.config)
    rgb16 = attrs.evolve(small.unet, in_channels=3, out_channels=3, sample_size=16)
    model = UnCLIPDecoder(attrs.evolve(small, unet=rgb16, text_len=9)).eval()
    x, t, image, text, tokens, mask = model.example_inputs(2)
    assert x.shape == (2, 3, 16, 16) and tokens.shape == (2, 9, 24)
    with torch.no_grad():
        assert model(x, t, image, text, tokens, mask).shape == (2, 3, 16, 16)
    assert model.sample(image, steps=2).shape == (2, 3, 16, 16)
    assert (model.image_spec().size, model.image_spec().channels) == (16, 3)


def test_model_contracts(registered):
    contracts.check_all_model_contracts(SPEC)

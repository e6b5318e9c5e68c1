"""The core masked autoencoder: parity with transformers' ViTMAE, masking, patches, the loss."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from polymodal.nn import BlockConfig
from polymodal.nn.encoders import ViTEncoderConfig
from polymodal.nn.mae import (
    MAE,
    MAEConfig,
    masked_patch_loss,
    masking_from_noise,
    noise_from_mask,
    normalise_patches,
    patchify,
    unpatchify,
)
from polymodal.plugins.pixel.convert import convert_hf_vitmae, mae_config_from_hf, mae_state_from_hf

ATOL = 1e-5


# -- parity with transformers ------------------------------------------------------------------


def hf_mae(norm_pix_loss: bool, seed: int):
    """A small random ViTMAEForPreTraining with every weight (position tables included) visibly random."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTMAEConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=16,
        patch_size=4,
        num_channels=3,
        decoder_hidden_size=24,
        decoder_num_hidden_layers=2,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=48,
        norm_pix_loss=norm_pix_loss,
        mask_ratio=0.75,
        layer_norm_eps=1e-12,
    )
    torch.manual_seed(seed)
    model = transformers.ViTMAEForPreTraining(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module", params=[True, False], ids=["norm-pix", "raw-pix"])
def pair(request, tmp_path_factory):
    """(transformers model, core MAE converted from its saved folder)."""
    hf = hf_mae(request.param, seed=3)
    folder = tmp_path_factory.mktemp("vitmae")
    hf.save_pretrained(folder, safe_serialization=True)
    return hf, convert_hf_vitmae(folder)


def test_encoder_decoder_and_loss_match_transformers(pair):
    hf, pm = pair
    g = torch.Generator().manual_seed(0)
    x, noise = torch.rand(3, 3, 16, 16, generator=g), torch.rand(3, 16, generator=g)
    with torch.no_grad():
        want = hf(pixel_values=x, noise=noise)
        latent = hf.vit(pixel_values=x, noise=noise).last_hidden_state  # (3, 1 + 4, 32)
        got = pm(x, noise=noise)
    assert got.latent.shape == latent.shape == (3, 5, 32)
    assert got.pred.shape == want.logits.shape == (3, 16, 48)
    assert want.logits.abs().max() > 0.1 and latent.abs().max() > 0.1
    torch.testing.assert_close(got.latent, latent, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.pred, want.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.loss, want.loss, atol=ATOL, rtol=0)
    assert torch.equal(got.mask, want.mask.float()) and torch.equal(got.ids_restore, want.ids_restore)


def test_in_memory_state_dict_converts_too():
    """The module names of transformers 5.x (q_proj, layers.i …) map onto the same weights."""
    hf = hf_mae(True, seed=5)
    cfg = mae_config_from_hf(hf.config.to_dict())
    pm = MAE(cfg).eval()
    pm.load_state_dict(mae_state_from_hf(hf.state_dict(), cfg.encoder.depth, cfg.decoder_depth), strict=True)
    x, noise = torch.rand(2, 3, 16, 16), torch.rand(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(pm(x, noise=noise).pred, hf(pixel_values=x, noise=noise).logits, atol=ATOL, rtol=0)


def test_a_swapped_weight_breaks_parity(pair):
    """The comparison can fail: the decoder's first two blocks exchanged give different outputs."""
    hf, pm = pair
    x, noise = torch.rand(2, 3, 16, 16), torch.rand(2, 16)
    state = {k: v.clone() for k, v in pm.state_dict().items()}
    broken = MAE(pm.cfg).eval()
    for k in list(state):
        if k.startswith("decoder.blocks.0."):
            other = k.replace("blocks.0.", "blocks.1.")
            state[k], state[other] = state[other], state[k]
    broken.load_state_dict(state)
    with torch.no_grad():
        assert (broken(x, noise=noise).pred - hf(pixel_values=x, noise=noise).logits).abs().max() > 1e-2


def test_patchify_matches_transformers_and_round_trips(pair):
    hf, _ = pair
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(patchify(x, 4), hf.patchify(x), atol=0, rtol=0)
    assert torch.equal(unpatchify(patchify(x, 4), 4, (4, 4), 3), x)
    strip = torch.rand(2, 1, 6, 30)
    assert torch.equal(unpatchify(patchify(strip, 6), 6, (1, 5), 1), strip)
    with pytest.raises(ValueError, match="divisible by the patch size 4"):
        patchify(torch.rand(1, 3, 15, 16), 4)


# -- masking -----------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 4), n=st.integers(1, 30), ratio=st.floats(0.0, 0.95), seed=st.integers(0, 10**6))
def test_masking_from_noise_keeps_the_lowest_noise(b, n, ratio, seed):
    noise = torch.rand(b, n, generator=torch.Generator().manual_seed(seed))
    k = int(n * (1 - ratio))
    keep, mask, ids_restore = masking_from_noise(noise, k)
    assert keep.shape == (b, k) and mask.shape == (b, n)
    assert torch.equal(mask.sum(1), torch.full((b,), float(n - k)))
    for row in range(b):
        visible = set(keep[row].tolist())
        assert visible == set(torch.argsort(noise[row])[:k].tolist())
        assert all((mask[row, i] == 0) == (i in visible) for i in range(n))
    shuffled = torch.gather(torch.arange(n).expand(b, n), 1, torch.argsort(noise, 1))
    assert torch.equal(torch.gather(shuffled, 1, ids_restore), torch.arange(n).expand(b, n))


@settings(max_examples=40, deadline=None)
@given(data=st.data(), b=st.integers(1, 4), n=st.integers(2, 24))
def test_noise_from_mask_hides_exactly_the_mask_when_padding_suffices(data, b, n):
    lengths = data.draw(st.lists(st.integers(1, n), min_size=b, max_size=b))
    valid = torch.arange(n)[None] < torch.tensor(lengths)[:, None]  # (B, N)
    mask = torch.zeros(b, n, dtype=torch.bool)
    for row, length in enumerate(lengths):
        picks = data.draw(st.sets(st.integers(0, length - 1), max_size=length))
        mask[row, sorted(picks)] = True
    noise, len_keep = noise_from_mask(mask, valid)
    _, hidden, _ = masking_from_noise(noise, len_keep)
    hidden = hidden.bool()
    assert len_keep == n - int(mask.sum(1).max())
    assert (hidden >= mask).all()  # every masked patch is hidden
    extra = hidden & ~mask  # beyond the mask only padding, unless a row lacked padding
    for row in range(b):
        spare = int((~valid[row]).sum())
        need = int(mask.sum(1).max() - mask[row].sum())
        if spare >= need:
            assert not (extra[row] & valid[row]).any()


def test_loss_counts_only_weighted_patches():
    pred, target = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    weight = torch.tensor([[1.0, 0, 0, 1, 0], [0, 0, 1, 0, 0]])
    changed = pred.clone()
    changed[weight == 0] += 10.0
    assert masked_patch_loss(changed, target, weight) == masked_patch_loss(pred, target, weight)
    want = ((pred - target) ** 2).mean(-1)[weight.bool()].mean()
    torch.testing.assert_close(masked_patch_loss(pred, target, weight), want)
    assert masked_patch_loss(pred, target, torch.zeros(2, 5)) == 0


def test_normalised_patches_have_zero_mean_unit_variance():
    t = normalise_patches(torch.rand(3, 7, 16) * 5 + 2)
    torch.testing.assert_close(t.mean(-1), torch.zeros(3, 7), atol=1e-5, rtol=0)
    torch.testing.assert_close(t.var(-1), torch.ones(3, 7), atol=1e-3, rtol=0)


# -- a 1×N strip with padding --------------------------------------------------------------------


def strip_mae() -> MAE:
    enc = ViTEncoderConfig(
        image_size=4, patch_size=4, channels=1, depth=2, block=BlockConfig(dim=16, heads=2), pos_embed="sincos"
    )
    return MAE(
        MAEConfig(
            encoder=enc, grid_rows=1, grid_cols=6, decoder_dim=16, decoder_depth=1, decoder_heads=2, mask_ratio=0.25
        )
    ).eval()


def test_padding_is_invisible_to_the_encoder_and_the_loss():
    torch.manual_seed(0)
    model = strip_mae()
    images = torch.rand(2, 1, 4, 24)
    valid = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    mask = torch.tensor([[False, True, False, False, False, False], [False, False, True, True, False, False]])
    noise, len_keep = noise_from_mask(mask, valid)
    other = images.clone()
    other[0, :, :, 16:] = torch.rand(1, 4, 8)  # new padding pixels in row 0
    with torch.no_grad():
        a = model(images, noise=noise, len_keep=len_keep, valid=valid)
        b = model(other, noise=noise, len_keep=len_keep, valid=valid)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(a.pred[valid], b.pred[valid], atol=1e-6, rtol=0)
    assert torch.equal(a.mask.bool(), mask | torch.tensor([[False] * 5 + [True], [False] * 6]))


def test_loss_is_invariant_to_batch_order():
    torch.manual_seed(0)
    model = strip_mae()
    images, noise = torch.rand(4, 1, 4, 24), torch.rand(4, 6)
    order = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        torch.testing.assert_close(
            model(images, noise=noise).loss, model(images[order], noise=noise[order]).loss, atol=1e-6, rtol=0
        )


def test_reconstruction_keeps_visible_patches():
    model = strip_mae()
    images, noise = torch.rand(2, 1, 4, 24), torch.rand(2, 6)
    with torch.no_grad():
        out = model(images, noise=noise)
        recon = model.reconstruct(out.pred, images, out.mask)
    visible = (out.mask == 0).repeat_interleave(4, dim=1)[:, None, None, :].expand_as(images)
    torch.testing.assert_close(recon[visible], images[visible], atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "bad, needle",
    [
        (torch.rand(2, 1, 4, 20), "(B, 1, 4, 24)"),
        (torch.rand(2, 3, 4, 24), "got (2, 3, 4, 24)"),
        (torch.rand(1, 4, 24), "1×6 patches of 4×4"),
    ],
)
def test_wrong_images_name_expected_and_given(bad, needle):
    with pytest.raises(ValueError) as info:
        strip_mae()(bad)
    assert needle in str(info.value)


def test_config_rejects_half_a_grid():
    with pytest.raises(ValueError, match="grid_rows and grid_cols"):
        MAEConfig(grid_rows=1)

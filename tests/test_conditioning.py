"""The UNet conditioning modules of polymodal.nn.conditioning equal diffusers' on the same weights."""

from __future__ import annotations

import pytest
import torch

from polymodal.nn.conditioning import TextImageProjection, TextImageTimeEmbedding

pytestmark = pytest.mark.usefixtures("one_thread")
embeddings = pytest.importorskip("diffusers.models.embeddings")


@pytest.mark.parametrize("dims", [(12, 8, 16, 10), (5, 7, 3, 2)])
def test_text_image_projection_is_diffusers_kandinsky_encoder_hid_proj(dims):
    text_dim, image_dim, context_dim, tokens = dims
    torch.manual_seed(0)
    theirs = embeddings.TextImageProjection(text_dim, image_dim, context_dim, tokens)
    ours = TextImageProjection(text_dim, image_dim, context_dim, image_tokens=tokens)
    ours.load_state_dict(theirs.state_dict())  # the same names, strictly
    text, image = torch.randn(3, 6, text_dim), torch.randn(3, image_dim)
    out = ours(text, image)
    assert out.shape == (3, tokens + 6, context_dim)
    torch.testing.assert_close(out, theirs(text_embeds=text, image_embeds=image), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dims", [(12, 8, 32), (4, 9, 6)])
def test_text_image_time_embedding_is_diffusers_kandinsky_add_embedding(dims):
    text_dim, image_dim, time_dim = dims
    torch.manual_seed(1)
    theirs = embeddings.TextImageTimeEmbedding(text_dim, image_dim, time_dim)
    torch.nn.init.normal_(theirs.text_norm.weight)  # not the identity norm, so its weights are compared too
    ours = TextImageTimeEmbedding(text_dim, image_dim, time_dim)
    ours.load_state_dict(theirs.state_dict())
    text, image = torch.randn(4, text_dim), torch.randn(4, image_dim)
    torch.testing.assert_close(ours(text, image), theirs(text, image), atol=1e-6, rtol=1e-6)


def test_mismatched_batches_name_both():
    with pytest.raises(ValueError, match="one batch; got 2 and 3"):
        TextImageProjection(4, 4, 4, 2)(torch.randn(2, 5, 4), torch.randn(3, 4))
    with pytest.raises(ValueError, match="one batch; got 2 and 3"):
        TextImageTimeEmbedding(4, 4, 8)(torch.randn(2, 4), torch.randn(3, 4))

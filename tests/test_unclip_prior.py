"""The unCLIP diffusion prior (issue 19): parity with diffusers' PriorTransformer through the
``diffusers-prior`` converter, the x0 loss with text dropout, guidance, best-of-candidates sampling,
de-normalisation, clear errors and the model contracts."""

from __future__ import annotations

import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import polymodal
from polymodal.diffusion import make_sampler
from polymodal.diffusion import sample as diffusion_sample
from polymodal.io.folders import LoadError
from polymodal.plugins.unclip.convert_prior import convert_diffusers_prior, load_diffusers_prior
from polymodal.plugins.unclip.prefix import PrefixCachedPrior
from polymodal.plugins.unclip.prior import VARIANTS, DiffusionPrior, PriorConfig, select_candidates
from polymodal.registry import get_registry
from polymodal.testing import contracts

pytestmark = pytest.mark.usefixtures("one_thread")
SPEC = VARIANTS["unclip-prior"]


@pytest.fixture(scope="module")
def registered():
    """The variant is in the registry (the plugin's entry point): loading a folder finds the class by family."""
    assert ("model", "unclip-prior") in get_registry()
    yield


def tiny_prior(seed: int = 0, **changes) -> DiffusionPrior:
    torch.manual_seed(seed)
    cfg = attrs.evolve(DiffusionPrior.tiny_config(PriorConfig()), embed_dim=8, text_dim=6, text_len=5, **changes)
    return DiffusionPrior(cfg).eval()


def text_inputs(model: DiffusionPrior, b: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    mask = torch.ones(b, c.text_len, dtype=torch.bool)
    mask[: b // 2, 2:] = False  # some prompts padded after 2 tokens
    return torch.randn(b, c.embed_dim, generator=g), torch.randn(b, c.text_len, c.text_dim, generator=g), mask


# -- parity with diffusers ----------------------------------------------------------------------------------

PRIOR_CONFIGS = [
    dict(num_attention_heads=2, attention_head_dim=8, num_layers=2, embedding_dim=12, num_embeddings=7),
    dict(num_attention_heads=4, attention_head_dim=4, num_layers=1, embedding_dim=16, num_embeddings=5),
    dict(
        num_attention_heads=1,
        attention_head_dim=16,
        num_layers=3,
        embedding_dim=8,
        num_embeddings=10,
        norm_in_type="layer",
        embedding_proj_norm_type="layer",
    ),
]


def diffusers_prior(folder, seed: int, **kwargs):
    """A randomly initialised PriorTransformer (zero-initialised tensors made random), saved to ``folder``."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    ref = diffusers.PriorTransformer(additional_embeddings=4, **kwargs)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
        ref.clip_std.fill_(1.0)  # its zeros default is a placeholder
        ref.clip_mean.copy_(torch.randn_like(ref.clip_mean))
    ref.save_pretrained(folder)
    return ref.eval()


@pytest.mark.parametrize("kwargs", PRIOR_CONFIGS, ids=["2x8-l2", "4x4-l1", "1x16-l3-norms"])
def test_converted_prior_predicts_the_same_embedding(tmp_path, kwargs, registered):
    ref = diffusers_prior(tmp_path / "src", 0, **kwargs)
    model = convert_diffusers_prior(tmp_path / "src", tmp_path / "dst")
    loaded = polymodal.load(tmp_path / "dst")
    e, n, b = kwargs["embedding_dim"], kwargs["num_embeddings"], 4
    g = torch.Generator().manual_seed(3)
    x, proj, hidden = torch.randn(b, e, generator=g), torch.randn(b, e, generator=g), torch.randn(b, n, e, generator=g)
    t = torch.tensor([0, 17, 500, 999])
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1, 3:], mask[2, 1:] = False, False  # padded prompts (the first token is always real, as CLIP's BOS)
    with torch.no_grad():
        want = ref(x, t, proj_embedding=proj, encoder_hidden_states=hidden, attention_mask=mask)
        want = want.predicted_image_embedding  # (B, E)
        for m in (model, loaded):
            got = m(x, t, proj, hidden, mask)  # (B, E)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        assert not torch.allclose(model(x, t, proj, hidden, torch.ones_like(mask)), want, atol=1e-3)  # mask matters
        torch.testing.assert_close(model.denormalise(want), ref.post_process_latents(want), atol=1e-6, rtol=0)
    assert isinstance(loaded, DiffusionPrior) and bool(loaded.stats_fitted)
    assert model.config.width == kwargs["num_attention_heads"] * kwargs["attention_head_dim"]


def test_converter_reads_a_pipeline_folder_and_its_prior_scheduler(tmp_path):
    diffusers_prior(tmp_path / "pipe" / "prior", 1, **PRIOR_CONFIGS[0])
    sched = tmp_path / "pipe" / "prior_scheduler"
    sched.mkdir()
    (sched / "scheduler_config.json").write_text(
        '{"_class_name": "UnCLIPScheduler", "num_train_timesteps": 500, "beta_schedule": "squaredcos_cap_v2", '
        '"prediction_type": "sample", "clip_sample": true, "clip_sample_range": 10.0}'
    )
    model = load_diffusers_prior(tmp_path / "pipe")
    assert model.config.schedule.timesteps == 500 and model.config.sampler.clip_range == 10.0


def test_converter_refuses_placeholder_stats_unsupported_options_and_pickles(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.PriorTransformer(num_attention_heads=2, attention_head_dim=4, num_layers=1, embedding_dim=8)
    ref.save_pretrained(tmp_path / "zeros")  # clip_std still all zeros
    with pytest.raises(LoadError, match="clip_std has zeros"):
        load_diffusers_prior(tmp_path / "zeros")
    other = diffusers.PriorTransformer(
        num_attention_heads=2, attention_head_dim=4, num_layers=1, embedding_dim=8, added_emb_type=None
    )
    other.save_pretrained(tmp_path / "noprd")
    with pytest.raises(ValueError, match=r"added_emb_type=None \(supported: 'prd'\)"):
        load_diffusers_prior(tmp_path / "noprd")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tmp_path / "zeros" / "config.json").read_text())
    (pickled / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(LoadError, match="does not unpickle"):
        load_diffusers_prior(pickled)


# -- training ----------------------------------------------------------------------------------------------


def test_loss_backward_and_shapes():
    model = tiny_prior().train()
    batch = model.example_batch(6, torch.Generator().manual_seed(0))
    loss, metrics = model.loss(batch)
    loss.backward()
    assert loss.dim() == 0 and torch.isfinite(loss) and {"mse", "text_dropped"} <= set(metrics)
    assert model.proj_to_clip_embeddings.weight.grad.abs().sum() > 0
    x, t, e, tokens, mask = model.example_inputs(3, torch.Generator().manual_seed(1))
    assert model(x, t, e, tokens, mask).shape == (3, 8)
    assert model(x, t, e, tokens[:, :3], mask[:, :3]).shape == (3, 8)  # shorter prompts are padded up to L


def test_dropped_text_is_the_learned_null():
    model = tiny_prior(text_dropout=1.0).train()
    batch = model.example_batch(4, torch.Generator().manual_seed(0))
    other = {**batch, "text_embed": torch.randn(4, 8), "text_tokens": torch.randn(4, 5, 6)}
    losses = []
    for b in (batch, other):
        torch.manual_seed(5)
        losses.append(model.loss(b)[0].item())
    assert losses[0] == losses[1]  # every text dropped: the text no longer matters
    null_embed, null_tokens, null_mask = model.null_condition(4)
    nulled = {**batch, "text_embed": null_embed.detach(), "text_tokens": null_tokens.detach(), "text_mask": null_mask}
    torch.manual_seed(5)
    torch.rand(4)  # the dropout draw the training loss makes first; in eval mode nothing is dropped
    assert model.eval().loss(nulled)[0].item() == pytest.approx(losses[0], abs=1e-6)
    kept = DiffusionPrior(attrs.evolve(model.config, text_dropout=0.0)).train()
    kept.load_state_dict(model.state_dict())
    kept_losses = []
    for b in (batch, other):
        torch.manual_seed(5)
        kept_losses.append(kept.loss(b)[0].item())
    assert kept_losses[0] != kept_losses[1]  # nothing dropped: the text matters


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 5), min_size=1, max_size=6),
    null_rows=st.lists(st.booleans(), min_size=6, max_size=6),
    seed=st.integers(0, 2**16),
)
def test_leaving_out_unattended_text_positions_gives_the_padded_result(lengths, null_rows, seed):
    """``grouped_forward`` (the training loss and sampling path) drops the text positions no row attends and
    runs all-attended (null-text) rows apart: the same x0 as ``forward`` on the text padded to L."""
    model = tiny_prior(depth=2)  # L = 5
    c, b = model.config, len(lengths)
    g = torch.Generator().manual_seed(seed)
    lengths_t = torch.tensor(lengths)  # (B,) real tokens per row, 0 … L
    mask = torch.arange(c.text_len)[None] < lengths_t[:, None]  # (B, L)
    mask |= torch.tensor(null_rows[:b])[:, None]  # null-text rows attend every position
    tokens = torch.randn(b, c.text_len, c.text_dim, generator=g)
    embed, noisy = torch.randn(b, c.embed_dim, generator=g), torch.randn(b, c.embed_dim, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    with torch.no_grad():
        full = model(noisy, t, embed, tokens, mask)
        grouped = model.grouped_forward(noisy, t, embed, tokens, mask)
    torch.testing.assert_close(grouped, full, atol=1e-5, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 5), min_size=1, max_size=6),
    null_rows=st.lists(st.booleans(), min_size=6, max_size=6),
    seed=st.integers(0, 2**16),
    norms=st.booleans(),
)
def test_sampling_with_the_text_prefix_cached_equals_the_full_pass_at_every_step(lengths, null_rows, seed, norms):
    """Sampling's :class:`PrefixCachedPrior` computes each row group's text prefix once and runs every step on the
    last three positions: at each of several steps (new noise and t, the same text) its x0 equals
    ``grouped_forward``'s; new text is noticed and computed afresh."""
    model = tiny_prior(depth=2, norm_in=norms, embed_norm=norms)  # L = 5
    c, b = model.config, len(lengths)
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(c.text_len)[None] < torch.tensor(lengths)[:, None]  # (B, L)
    mask |= torch.tensor(null_rows[:b])[:, None]  # null-text rows attend every position
    text = {
        "embed": torch.randn(b, c.embed_dim, generator=g),
        "tokens": torch.randn(b, c.text_len, c.text_dim, generator=g),
    }
    cached = PrefixCachedPrior(model)
    with torch.no_grad():
        for step in range(4):
            if step == 3:  # another prompt set: the prefix must not be reused
                text = {k: v + 1.0 for k, v in text.items()}
            noisy, t = torch.randn(b, c.embed_dim, generator=g), torch.randint(0, 1000, (b,), generator=g)
            want = model.grouped_forward(noisy, t, text["embed"], text["tokens"], mask)
            got = cached(noisy, t, {**text, "mask": mask})
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_sampling_runs_the_text_prefix_once_per_group():
    """Over a whole guided sampling the transformer sees the text positions once per row group (the prompts that
    attend all L positions with the learned null text, and the padded prompt on its one token): every other call
    is a step on the last three positions."""
    model = tiny_prior()
    embed, tokens, mask = text_inputs(model, 3)
    mask[0, 1:] = False  # the padded prompt: one token
    lengths = []
    original = model.transformer.forward

    def recorded(x, *args, **kwargs):
        lengths.append(x.shape[1])
        return original(x, *args, **kwargs)

    model.transformer.forward = recorded
    model.sample(embed, tokens, mask, generator=torch.Generator().manual_seed(0))
    L, steps = model.config.text_len, model.config.sampler.steps
    assert lengths == [L + 1, 3, 1 + 1, 3] + [3, 3] * (steps - 1), lengths


def test_fit_stats_normalises_and_denormalises():
    model = tiny_prior()
    embeds = 3.0 + 2.0 * torch.randn(500, 8)
    model.fit_stats(embeds)
    assert bool(model.stats_fitted)
    z = model.normalise(embeds)
    assert z.mean(0).abs().max() < 1e-4 and (z.std(0) - 1).abs().max() < 1e-4
    torch.testing.assert_close(model.denormalise(z), embeds, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"fit_stats expects image embeddings \(N ≥ 2, E=8\); got \(10, 7\)"):
        model.fit_stats(torch.randn(10, 7))


def test_standalone_training_on_images_is_refused_with_the_way():
    from polymodal.data import load_dataset

    with pytest.raises(ValueError, match="polymodal train unclip"):
        DiffusionPrior.config_for_data(PriorConfig(), load_dataset("digits"))
    with pytest.raises(ValueError, match=r"polymodal train unclip.*lacks \['image_embed'"):
        tiny_prior().loss({"image": torch.rand(2, 1, 8, 8), "label": torch.zeros(2)})


# -- errors ------------------------------------------------------------------------------------------------


def test_bad_inputs_name_expected_and_given():
    model = tiny_prior()
    x, t, e, tokens, mask = model.example_inputs(2)
    cases = [
        ((torch.randn(2, 9), t, e, tokens, mask), r"noisy must have shape \(B, 8\); got \(2, 9\)"),
        ((x, t, torch.randn(2, 7), tokens, mask), r"text_embed must have shape \(B, 8\); got \(2, 7\)"),
        ((x, t, e, torch.randn(2, 5, 4), mask), r"text_tokens must have shape \(2, n, 6\); got \(2, 5, 4\)"),
        ((x, t, e, torch.randn(2, 6, 6), None), r"text_tokens must hold 1 … L=5 tokens; got 6"),
        ((x, t, e, tokens, mask[:, :4]), r"text_mask must have shape \(2, 5\); got \(2, 4\)"),
        ((x, t, e[:1], tokens[:1], mask[:1]), r"text_embed must have the batch of noisy \(2\); got 1"),
        (
            (x, torch.zeros(3, dtype=torch.long), e, tokens, mask),
            r"t must be a scalar or have shape \(2,\); got \(3,\)",
        ),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            model(*args)
    with pytest.raises(ValueError, match="candidates must be an integer ≥ 1; got 0"):
        model.sample(e, tokens, mask, candidates=0)
    with pytest.raises(ValueError, match="heads must divide width; got width=16, heads=3"):
        PriorConfig(width=16, heads=3)
    with pytest.raises(ValueError, match="prediction must be 'sample'"):
        PriorConfig(schedule=attrs.evolve(PriorConfig().schedule, prediction="epsilon"))


# -- sampling ----------------------------------------------------------------------------------------------


def test_select_candidates_keeps_the_higher_dot_product_of_unit_vectors():
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # (B, E)
    aligned, longer = torch.tensor([[0.5, 0.0], [0.0, 0.1]]), torch.tensor([[3.0, 3.0], [2.0, 2.0]])
    chosen = select_candidates(torch.stack([longer, aligned]), text)  # (K=2, B, E) → (B, E)
    torch.testing.assert_close(chosen, aligned)  # the raw dot product would prefer `longer`
    chosen = select_candidates(torch.stack([aligned, -aligned]), text)
    torch.testing.assert_close(chosen, aligned)
    with pytest.raises(ValueError, match=r"expected candidates \(K, B, E\) and text_embed \(B, E\)"):
        select_candidates(torch.randn(2, 3), text)


def test_sample_keeps_the_candidate_closest_to_the_text():
    model = tiny_prior()
    with torch.no_grad():
        model.clip_mean.normal_()
    e, tokens, mask = text_inputs(model, 3)
    best = model.sample(e, tokens, mask, candidates=2, generator=torch.Generator().manual_seed(7))  # (B, E)
    # the same draws as one batch of 2B prompts: the two candidates of every prompt
    both = model.sample(
        e.repeat(2, 1),
        tokens.repeat(2, 1, 1),
        mask.repeat(2, 1),
        candidates=1,
        generator=torch.Generator().manual_seed(7),
    ).reshape(2, 3, 8)  # (K, B, E)
    torch.testing.assert_close(best, select_candidates(both, e), atol=1e-5, rtol=0)
    sims = torch.nn.functional.cosine_similarity(both, e[None], dim=-1)  # (K, B)
    for b in range(3):
        torch.testing.assert_close(best[b], both[int(sims[:, b].argmax()), b], atol=1e-5, rtol=0)


def test_guidance_scale_one_is_the_conditional_model():
    model = tiny_prior()
    e, tokens, mask = text_inputs(model, 2)
    run = dict(candidates=1, sampler="ddim", steps=4)
    one = model.sample(e, tokens, mask, guidance_scale=1, generator=torch.Generator().manual_seed(2), **run)
    sampler = make_sampler(model.schedule, model.config.sampler, name="ddim", steps=4)
    with torch.no_grad():
        plain = diffusion_sample(
            lambda x, t: model(x, t, e, tokens, mask), sampler, (2, 8), generator=torch.Generator().manual_seed(2)
        ).images
    torch.testing.assert_close(one, model.denormalise(plain), atol=1e-6, rtol=0)
    guided = model.sample(e, tokens, mask, guidance_scale=3, generator=torch.Generator().manual_seed(2), **run)
    with torch.no_grad():
        model.null_text_embed.add_(5.0)  # a different null: no effect at scale 1, an effect at scale 3
    again = model.sample(e, tokens, mask, guidance_scale=1, generator=torch.Generator().manual_seed(2), **run)
    torch.testing.assert_close(again, one, atol=0, rtol=0)
    moved = model.sample(e, tokens, mask, guidance_scale=3, generator=torch.Generator().manual_seed(2), **run)
    assert (moved - guided).abs().max() > 1e-3
    null = (torch.zeros(1, 8), torch.zeros(1, 2, 6), None)  # an explicit null (a converted model's empty prompt)
    given = model.sample(e, tokens, mask, guidance_scale=3, null_text=null, generator=torch.Generator().manual_seed(2))
    assert given.shape == (2, 8) and torch.isfinite(given).all()
    per_prompt = (torch.zeros(2, 8), torch.zeros(2, 2, 6), None)  # one null per prompt, repeated per candidate
    again = model.sample(
        e, tokens, mask, null_text=per_prompt, candidates=2, generator=torch.Generator().manual_seed(2)
    )
    assert again.shape == (2, 8)
    with pytest.raises(ValueError, match=r"null_text must have batch 1 or 2 \(the prompts'\); got 3"):
        model.sample(e, tokens, mask, null_text=(torch.zeros(3, 8), torch.zeros(3, 2, 6), None))


def test_sample_returns_clip_space_embeddings():
    model = tiny_prior()
    with torch.no_grad():
        model.clip_mean.fill_(50.0)
        model.clip_std.fill_(0.01)
    e, tokens, mask = text_inputs(model, 4)
    out = model.sample(e, tokens, mask, generator=torch.Generator().manual_seed(0))  # (B, E)
    assert out.shape == (4, 8)
    assert ((out - 50.0).abs() <= 0.05 + 1e-4).all()  # x0 clipped to ±5 normalised units, then de-normalised
    assert out.std() > 0


# -- contracts ---------------------------------------------------------------------------------------------


def test_prior_meets_the_model_contracts(registered):
    contracts.check_all_model_contracts(SPEC)

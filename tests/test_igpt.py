"""iGPT: palette k-means, tokens, the decoder's iGPT details, KV-cache decoding, sampling, the probe,
input checks, and parity with transformers' ImageGPT through ``polymodal convert --from hf-imagegpt``.

Models here are tiny and untrained (or trained for a few steps); the trained recipe's bars
are in ``test_igpt_quality.py``. Every transformers model is built from a small config with
random weights (nothing is downloaded).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import polymodal
from polymodal.cli import main
from polymodal.data import load_dataset
from polymodal.eval.images import read_image, save_png
from polymodal.io import LoadError
from polymodal.nn import KVCache, QuickGELU, RMSNorm
from polymodal.plugins.igpt import IGPT, IGPTConfig, probe
from polymodal.plugins.igpt import palette as pal
from polymodal.plugins.igpt.convert import convert_hf_imagegpt

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-5


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def small(**kw) -> IGPT:
    """A small seeded iGPT (width 32, depth 2) for 8×8 grey images, with a fitted 16-grey palette."""
    torch.manual_seed(kw.pop("seed", 0))
    cfg = dict(image_size=8, channels=1, palette_size=16, dim=32, depth=2, heads=4)
    model = IGPT(IGPTConfig(**{**cfg, **kw}))
    model.palette.copy_(torch.linspace(0, 1, model.config.palette_size)[:, None].repeat(1, model.config.channels))
    model.palette_fitted.fill_(True)
    return model.eval()


def perturbed(model: IGPT, seed: int = 1) -> IGPT:
    """Add visible noise to every parameter (the zero-initialised head would hide everything else)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


def stream(model: IGPT, b: int, n: int | None = None, seed: int = 0) -> torch.Tensor:
    """Random input streams (b, n): the start token then palette ids."""
    ids = torch.randint(
        0, model.config.palette_size, (b, n or model.num_tokens), generator=torch.Generator().manual_seed(seed)
    )
    ids[:, 0] = model.sos
    return ids


# -- palette and tokens ---------------------------------------------------------------------------


def test_kmeans_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.1, 0.1, 0.1], [0.9, 0.2, 0.1], [0.2, 0.3, 0.9]])
    points = centres.repeat_interleave(200, 0) + 0.02 * torch.randn(600, 3, generator=g)  # (600, 3)
    found = pal.kmeans(points, 3)
    order = torch.cdist(centres, found).argmin(1)
    assert sorted(order.tolist()) == [0, 1, 2]
    torch.testing.assert_close(found[order], centres, atol=0.01, rtol=0)
    assert torch.equal(found, pal.kmeans(points, 3))  # deterministic


def test_kmeans_weights_pull_the_centre():
    points = torch.tensor([[0.0], [1.0]])
    assert pal.kmeans(points, 1, torch.tensor([3.0, 1.0])).item() == pytest.approx(0.25)


def test_kmeans_keeps_every_colour_when_there_are_few():
    points = torch.tensor([[0.5], [0.0], [1.0]])
    found = pal.kmeans(points, 5)
    assert found.shape == (5, 1)
    assert found[:3, 0].tolist() == [0.0, 0.5, 1.0]  # sorted by brightness, the rest repeat the last


def test_digit_palette_merges_the_17_grey_levels_into_16(digits):
    images = digits.train["image"]
    colours, counts = pal.distinct_colours(images)
    assert len(colours) == 17 and counts.sum() == images.numel()
    palette = pal.fit_palette(images, 16)
    assert palette.shape == (16, 1) and palette.min() == 0.0 and (palette.diff(dim=0) > 0).all()
    levels = colours[:, 0]
    hits = torch.cdist(levels[:, None], palette).min(1).values < 1e-6
    assert hits.sum() == 15  # two neighbouring levels share one (weighted mean) centre
    tokens = pal.to_tokens(images, palette)
    assert tokens.shape == (len(images), 64) and len(tokens.unique()) == 16


def test_tokens_round_trip_in_raster_order():
    palette = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    ids = torch.randint(0, 4, (3, 16), generator=torch.Generator().manual_seed(0))
    images = pal.to_images(ids, palette, 4)  # (3, 3, 4, 4)
    assert images.shape == (3, 3, 4, 4)
    assert torch.equal(images[1, :, 2, 3], palette[ids[1, 2 * 4 + 3]])  # row 2, column 3 is token 11
    assert torch.equal(pal.to_tokens(images, palette), ids)
    noisy = (images + 0.1 * torch.rand(images.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    assert torch.equal(pal.to_tokens(noisy, palette), ids)  # nearest colour


def test_bad_ids_and_shapes_are_named():
    palette = torch.rand(4, 1)
    with pytest.raises(ValueError, match=r"\[0, 3\].*\[0, 4\]"):
        pal.to_images(torch.tensor([[0, 4, 1, 2]]), palette, 2)
    with pytest.raises(ValueError, match=r"\(B, 9\).*\(1, 4\)"):
        pal.to_images(torch.zeros(1, 4, dtype=torch.long), palette, 3)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\).*\(2, 3, 4, 4\)"):
        pal.to_tokens(torch.rand(2, 3, 4, 4), palette)


def test_unigram_baseline_is_the_entropy_of_the_histogram():
    train = torch.tensor([[0, 0, 0, 1]])
    test = torch.tensor([[0, 1]])
    p0, p1 = 4 / 6, 2 / 6  # add-one smoothing over 2 colours
    assert pal.unigram_bits(train, test, 2) == pytest.approx(-(math.log2(p0) + math.log2(p1)) / 2)


def test_palette_is_fitted_on_the_first_training_batch_and_saved(digits, tmp_path):
    torch.manual_seed(0)
    model = IGPT(IGPTConfig(dim=16, depth=1, heads=2))
    assert not bool(model.palette_fitted)
    model.train()
    model.loss(digits.train.batch(list(range(32))))
    assert bool(model.palette_fitted)
    assert torch.equal(model.palette, pal.fit_palette(digits.train["image"][:32], 16))
    model.save(tmp_path / "m")
    loaded = polymodal.load(tmp_path / "m")
    assert torch.equal(loaded.palette, model.palette) and bool(loaded.palette_fitted)


# -- the decoder ------------------------------------------------------------------------------------


def test_igpt_details_come_from_core_parts():
    model = small()
    block = model.blocks.blocks[0]
    for norm in (block.norm1, block.norm2, model.blocks.norm):
        assert isinstance(norm, RMSNorm) and norm.weight is not None and not hasattr(norm, "bias")
    assert isinstance(block.mlp.act, QuickGELU)
    assert model.head.bias is None and model.head.weight.data_ptr() != model.token_embed.weight.data_ptr()
    assert model.token_embed.num_embeddings == 17 and model.sos == 16
    assert model.pos_embed.weight.shape == (1, 64, 32) and model.pos_embed.weight.requires_grad


def test_zero_initialised_head_predicts_the_uniform_distribution(digits):
    model = small()
    assert torch.count_nonzero(model.head.weight) == 0
    logits = model(stream(model, 3))
    assert logits.shape == (3, 64, 16) and torch.count_nonzero(logits) == 0
    loss, metrics = model.loss(digits.train.batch(list(range(8))))
    assert loss.item() == pytest.approx(math.log(16), abs=1e-6)
    assert metrics["bits_per_token"] == pytest.approx(4.0, abs=1e-6)


def test_the_start_token_is_learned(digits):
    model = small().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    batch = digits.train.batch(list(range(16)))
    before = model.token_embed.weight[model.sos].clone()
    for _ in range(2):  # the first step moves only the zero head; then gradients reach the embeddings
        loss, _ = model.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model.token_embed.weight.grad[model.sos].abs().sum() > 0
    assert not torch.equal(model.token_embed.weight[model.sos], before)


@pytest.mark.parametrize("j", [1, 17, 40, 63])
def test_changing_a_later_pixel_leaves_earlier_logits_alone(j):
    model = perturbed(small())
    ids = stream(model, 2)
    other = ids.clone()
    other[:, j] = (other[:, j] + 5) % 16
    with torch.no_grad():
        a, b = model(ids), model(other)
    assert torch.equal(a[:, :j], b[:, :j])
    assert (a[:, j:] - b[:, j:]).abs().amax() > 1e-3  # and it does change the logits from j on


@st.composite
def decodes(draw):
    """(batch, length, chunk cut points, seed) for incremental decoding."""
    n = draw(st.integers(1, 64))
    one_by_one = draw(st.booleans())
    cuts = list(range(1, n)) if one_by_one else draw(st.lists(st.integers(1, max(1, n - 1)), max_size=5))
    return draw(st.integers(1, 3)), n, sorted({c for c in cuts if 0 < c < n}), draw(st.integers(0, 2**31 - 1))


@pytest.fixture(scope="module")
def decoder():
    return perturbed(small(dim=32, depth=3))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(decodes())
def test_kv_cache_decoding_equals_the_full_forward(decoder, case):
    b, n, cuts, seed = case
    ids = stream(decoder, b, n, seed)
    with torch.no_grad():
        full = decoder(ids)  # (B, n, K)
        cache, outs = KVCache(), []
        for start, end in zip([0, *cuts], [*cuts, n]):
            outs.append(decoder(ids[:, start:end], cache=cache))
            assert cache.length == end
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=ATOL, rtol=0)


def test_too_long_or_out_of_range_ids_are_named():
    model = small()
    with pytest.raises(ValueError, match=r"at most 64 positions.*0 cached \+ 65 new"):
        model(stream(model, 1, 64).repeat(1, 2)[:, :65])
    cache = KVCache()
    model(stream(model, 1, 60), cache=cache)
    with pytest.raises(ValueError, match=r"60 cached \+ 5 new"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match=r"\[0, 16\].*\[16, 17\]"):
        model(torch.tensor([[16, 17]]))
    with pytest.raises(ValueError, match="integer token ids"):
        model(torch.rand(1, 4))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\).*\(2, 3, 8, 8\)"):
        model.tokens(torch.rand(2, 3, 8, 8))


# -- sampling -------------------------------------------------------------------------------------


def test_samples_have_the_image_shape_and_palette_colours():
    model = perturbed(small())
    images = model.sample(5, seed=3, top_k=4)
    assert images.shape == (5, 1, 8, 8)
    assert torch.isin(images.flatten(), model.palette.flatten()).all()
    assert torch.equal(images, model.sample(5, seed=3, top_k=4))  # seeded
    assert not torch.equal(images, model.sample(5, seed=4, top_k=4))


def test_cached_and_uncached_sampling_agree():
    model = perturbed(small())
    a = model.sample_tokens(4, seed=7, use_cache=True)
    b = model.sample_tokens(4, seed=7, use_cache=False)
    assert a.shape == (4, 64) and torch.equal(a, b)


def test_top_k_1_is_greedy_token_by_token():
    model = perturbed(small())
    tokens = model.sample_tokens(2, seed=0, top_k=1)
    with torch.no_grad():
        logits = model(model.inputs(tokens))  # (2, 64, 16)
    assert torch.equal(tokens, logits.argmax(-1))


def test_completion_keeps_the_top_half(tmp_path):
    model = perturbed(small())
    image = model.images(torch.randint(0, 16, (1, 64), generator=torch.Generator().manual_seed(2)))[0]  # (1, 8, 8)
    path = save_png(image, tmp_path / "top.png")
    out = model.complete(model.read_for_completion(path), 6, seed=1)
    assert out.shape == (6, 1, 8, 8)
    assert torch.equal(out[:, :, :4], image[None, :, :4].expand(6, -1, -1, -1))
    assert not all(torch.equal(out[i, :, 4:], out[0, :, 4:]) for i in range(6))  # the bottoms differ


def test_non_finite_logits_stop_sampling():
    model = small()
    with torch.no_grad():
        model.head.weight[3, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        model.sample(2)


def test_sample_to_folder_and_its_bad_inputs(tmp_path):
    model = perturbed(small())
    paths = model.sample_to_folder(tmp_path / "s", n=3, seed=0, temperature=0.8, top_p=0.9)
    assert [p.name for p in paths] == ["sample_000.png", "sample_001.png", "sample_002.png", "grid.png"]
    assert read_image(paths[0], 1).shape == (1, 8, 8)
    with pytest.raises(ValueError, match="unconditional.*'a seven'"):
        model.sample_to_folder(tmp_path / "p", n=1, prompt="a seven")
    with pytest.raises(ValueError, match="does not support cfg_scale"):
        model.sample_to_folder(tmp_path / "c", n=1, cfg_scale=3.0)
    big = save_png(torch.rand(1, 12, 10), tmp_path / "big.png")
    with pytest.raises(ValueError, match=r"8×8 image.*10×12"):
        model.sample_to_folder(tmp_path / "b", n=1, complete=big)
    with pytest.raises(ValueError, match="temperature"):
        model.sample_to_folder(tmp_path / "t", n=1, temperature=0.0)
    assert not any((tmp_path / d).exists() for d in ("p", "c", "b", "t"))


def test_cli_sample_and_complete(tmp_path):
    model = perturbed(small())
    model.save(tmp_path / "m")
    runner = CliRunner()
    result = runner.invoke(main, ["sample", str(tmp_path / "m"), "-n", "4", "--out", str(tmp_path / "s"), "--no-cache"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "s" / "grid.png").is_file() and (tmp_path / "s" / "sample_003.png").is_file()
    top = save_png(torch.rand(1, 8, 8), tmp_path / "top.png")
    result = runner.invoke(
        main,
        [
            "sample",
            str(tmp_path / "m"),
            "-n",
            "2",
            "--complete",
            str(top),
            "--out",
            str(tmp_path / "c"),
            "--top-k",
            "3",
        ],
    )
    assert result.exit_code == 0, result.output
    done = read_image(tmp_path / "c" / "sample_001.png", 1)
    want = model.images(model.tokens(read_image(top, 1)[None]))[0]
    torch.testing.assert_close(done[:, :4], want[:, :4], atol=1 / 255, rtol=0)
    result = runner.invoke(main, ["sample", str(tmp_path / "m"), "--prompt", "a two"])
    assert result.exit_code != 0 and "unconditional" in result.output


# -- evaluation -----------------------------------------------------------------------------------


def test_linear_probe_separates_separable_features():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 4
    good = torch.nn.functional.one_hot(y, 4).float() * 3 + 0.3 * torch.randn(200, 4, generator=g)
    noise = torch.randn(200, 4, generator=g)
    accs = probe.probe_accuracies([noise[:150], good[:150]], y[:150], [noise[150:], good[150:]], y[150:])
    assert accs[1] == 1.0 and accs[0] < 0.6


def test_probe_plot_is_a_png(tmp_path):
    from PIL import Image

    path = probe.plot_probe([0.3, 0.8, 0.93, 0.9], tmp_path / "p.png", "title")
    with Image.open(path) as img:
        assert img.size == (560, 360) and img.mode == "RGB"
        colours = img.getcolors(maxcolors=100000)
    assert len(colours) > 3  # axes, grid, line, points and text, not a blank canvas


def test_evaluate_reports_nll_baseline_and_a_probe_per_layer(digits, tmp_path, monkeypatch):
    from polymodal.plugins.igpt.model import probe_plot_path

    monkeypatch.setenv("POLYMODAL_CACHE", str(tmp_path / "cache"))
    from polymodal.data import Dataset

    model = small(depth=2)
    data = Dataset("digits", digits.train.subset(list(range(300))), digits.test.subset(list(range(100))), digits.meta)
    metrics = model.evaluate(data)
    assert metrics["test_nll_bits_per_token"] == pytest.approx(4.0, abs=1e-5)  # zero head: uniform over 16
    assert 1.0 < metrics["unigram_nll_bits_per_token"] < 4.0
    accs = metrics["probe_accuracy_by_layer"]
    assert len(accs) == 3 and all(0.0 <= a <= 1.0 for a in accs)
    assert metrics["best_probe_accuracy"] == max(accs) == accs[metrics["best_probe_layer"]]
    assert "probe_plot" not in metrics  # neither a folder nor a path to write it to
    model.save(tmp_path / "m", metrics=metrics)
    assert (tmp_path / "m" / "probe_by_layer.png").is_file()  # the last evaluation's plot travels with a save
    loaded = polymodal.load(tmp_path / "m")
    (tmp_path / "m" / "probe_by_layer.png").unlink()
    again = loaded.evaluate(data)
    # evaluation only reads the folder: the plot of a loaded model goes under the cache (issue 14)
    assert again["probe_plot"] == str(probe_plot_path(tmp_path / "m"))
    assert Path(again["probe_plot"]).is_file() and not (tmp_path / "m" / "probe_by_layer.png").exists()
    assert again["probe_accuracy_by_layer"] == accs


def test_fd_judge_compares_judge_features_of_samples_and_test_images(digits, monkeypatch):
    import polymodal.eval.judge as judge_module

    class FakeJudge:
        """Features = the mean brightness of each image quarter; reads 8×8 images."""

        image_size = 8

        def embed(self, images):
            assert images.shape[1:] == (1, 8, 8)
            return images.unfold(2, 4, 4).unfold(3, 4, 4).mean((-1, -2)).flatten(1)  # (N, 4)

    monkeypatch.setattr(judge_module, "get_judge", lambda dataset: FakeJudge())
    model = perturbed(small())
    fd = model.fd_judge(digits, 64)
    want = judge_module.frechet_distance(FakeJudge().embed(model.sample(64)), FakeJudge().embed(digits.test["image"]))
    assert fd == pytest.approx(want) and fd > 0


# -- transformers ImageGPT ----------------------------------------------------------------------

transformers = pytest.importorskip("transformers")

SMALL = dict(
    vocab_size=17, n_positions=16, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
)


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Visible random values for every weight (norm gains around 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if ".ln_" in name else 0.0
            p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))


def convert_cli(src: Path, dst: Path):
    return CliRunner().invoke(main, ["convert", "--from", "hf-imagegpt", str(src), str(dst)])


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """(transformers ImageGPTForCausalImageModeling, converted polymodal model, folder)."""
    root = tmp_path_factory.mktemp("imagegpt")
    torch.manual_seed(0)
    hf = transformers.ImageGPTForCausalImageModeling(transformers.ImageGPTConfig(**SMALL, layer_norm_epsilon=1e-5))
    randomise(hf, 1)
    hf.eval()
    hf.save_pretrained(root / "hf", safe_serialization=True)
    clusters = torch.rand(16, 3, generator=torch.Generator().manual_seed(2)) * 2 - 1
    (root / "hf" / "preprocessor_config.json").write_text(json.dumps({"clusters": clusters.tolist()}))
    result = convert_cli(root / "hf", root / "pm")
    assert result.exit_code == 0, result.output
    return hf, polymodal.load(root / "pm"), root


def test_converted_logits_match_transformers(hf_pair):
    hf, pm, _ = hf_pair
    ids = torch.randint(0, 17, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(input_ids=ids).logits  # (3, 16, 16)
        got = pm(ids)
    assert got.shape == want.shape == (3, 16, 16)
    assert want.abs().max() > 0.5
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_converted_greedy_generation_matches_transformers(hf_pair):
    hf, pm, _ = hf_pair
    start = torch.full((2, 1), 16)
    with torch.no_grad():
        want = hf.generate(input_ids=start, max_length=16, do_sample=False, pad_token_id=0)  # (2, 16)
    got = torch.cat([start, pm.sample_tokens(2, top_k=1)[:, :15]], dim=1)
    assert torch.equal(got, want)


def test_converted_config_and_palette(hf_pair):
    hf, pm, root = hf_pair
    c = pm.config
    assert (c.image_size, c.channels, c.palette_size, c.dim, c.depth, c.heads, c.act) == (
        4,
        3,
        16,
        32,
        2,
        4,
        "quick_gelu",
    )
    assert c.norm_eps == hf.config.layer_norm_epsilon
    clusters = torch.tensor(json.loads((root / "hf" / "preprocessor_config.json").read_text())["clusters"])
    torch.testing.assert_close(pm.palette, (clusters + 1) / 2)
    assert bool(pm.palette_fitted)
    assert json.loads((root / "pm" / "config.json").read_text())["family"] == "igpt"


def test_convert_python_api_without_clusters(hf_pair, tmp_path):
    _, pm, root = hf_pair
    src = tmp_path / "bare"
    src.mkdir()
    for name in ("config.json", "model.safetensors"):
        (src / name).write_bytes((root / "hf" / name).read_bytes())
    model = convert_hf_imagegpt(src)
    assert not bool(model.palette_fitted)
    for key, value in pm.state_dict().items():
        if not key.startswith("palette"):
            assert torch.equal(model.state_dict()[key], value), key
    with pytest.raises(ValueError, match="no palette"):
        model.sample_to_folder(tmp_path / "out", n=1)


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"scale_attn_by_inverse_layer_idx": True}, "per-layer attention scale"),
        ({"scale_attn_weights": False}, "attention-scale option"),
        ({"n_positions": 15}, "square number"),
        ({"activation_function": "silu"}, "unsupported hidden_act 'silu'"),
        ({"model_type": "gpt2"}, "model_type 'imagegpt'"),
    ],
)
def test_unsupported_sources_are_refused_by_name(hf_pair, tmp_path, change, needle):
    _, _, root = hf_pair
    src = tmp_path / "src"
    src.mkdir()
    cfg = json.loads((root / "hf" / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, **change}))
    (src / "model.safetensors").write_bytes((root / "hf" / "model.safetensors").read_bytes())
    result = convert_cli(src, tmp_path / "out")
    assert result.exit_code != 0 and needle in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_missing_weight_is_named(hf_pair, tmp_path):
    from safetensors.torch import load_file, save_file

    _, _, root = hf_pair
    src = tmp_path / "partial"
    src.mkdir()
    state = load_file(str(root / "hf" / "model.safetensors"))
    del state["transformer.h.1.mlp.c_fc.weight"]
    save_file(state, str(src / "model.safetensors"))
    (src / "config.json").write_text((root / "hf" / "config.json").read_text())
    with pytest.raises(LoadError, match=r"h\.1\.mlp\.c_fc\.weight"):
        convert_hf_imagegpt(src)


# -- registered variants ------------------------------------------------------------------------


def test_registered_variants():
    digits, shapes = polymodal.create("igpt"), polymodal.create("igpt-shapes")
    assert (digits.config.image_size, digits.config.channels, digits.num_tokens) == (8, 1, 64)
    assert (shapes.config.image_size, shapes.config.channels, shapes.num_tokens) == (16, 3, 256)
    assert shapes.default_data == "shapes" and digits.default_data == "digits"

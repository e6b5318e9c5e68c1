"""FROMAGe: frozen parts stay frozen, [RET] plumbing, caching, bad input, folders and commands (tiny parts)."""

from __future__ import annotations

import attrs
import pytest
import torch
from click.testing import CliRunner

from polymodal.api import spec
from polymodal.data.base import Dataset, Split
from polymodal.plugins.fromage import Fromage
from polymodal.plugins.fromage.evaluate import named_digits
from polymodal.plugins.fromage.infer import caption, embed_texts, generate
from polymodal.plugins.fromage.samples import sample_to_folder
from polymodal.testing import contracts
from polymodal.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

TRAINABLE = ("adapter.", "ret_token_embed", "ret_head.", "image_head.", "contrastive.logit_scale")


def tiny_model(seed: int = 0, **overrides) -> Fromage:
    """A tiny FROMAGe on fresh tiny LM and CLIP parts, perturbed so nothing sits at its initial value."""
    return contracts.build("fromage", seed=seed, **overrides)


def tiny_digits(n: int = 24) -> Dataset:
    """A digits-like dataset at the tiny CLIP's 4×4 image size."""
    g = torch.Generator().manual_seed(0)

    def split() -> Split:
        labels = torch.arange(n) % 10
        return Split(
            {"image": torch.rand(n, 1, 4, 4, generator=g), "label": labels, "caption": [f"a {int(y)}" for y in labels]}
        )

    return Dataset("tiny-digits", split(), split(), {"class_names": list(map(str, range(10)))})


def test_only_the_joints_train():
    model = tiny_model()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(n.startswith(TRAINABLE) for n in names), names
    for prefix in TRAINABLE:
        assert any(n.startswith(prefix) for n in names), f"{prefix} does not train"
    assert not any(p.requires_grad for p in model.lm.parameters())
    assert not any(p.requires_grad for p in model.vision.parameters())
    counts = model.parameter_counts()
    assert counts["trainable_parameters"] == sum(
        p.numel() for n, p in model.named_parameters() if n.startswith(TRAINABLE)
    )
    assert counts["total_parameters"] > counts["trainable_parameters"]
    model.train()
    assert model.adapter.training and not model.lm.training and not model.vision.training


def test_training_steps_change_only_the_joints():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = attrs.evolve(spec("fromage").train, steps=3, batch_size=8, warmup_steps=0, checkpoint_every=0)
    train(model, tiny_digits(), cfg, progress=False)
    after = model.state_dict()
    frozen = [k for k in before if k.startswith(("lm.", "vision."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen), "a frozen weight changed"
    moved = [k for k in before if k.startswith(TRAINABLE) and not torch.equal(before[k], after[k])]
    for prefix in ("adapter.", "ret_token_embed", "ret_head.", "image_head."):
        assert any(k.startswith(prefix) for k in moved), f"{prefix} did not change in training"


def test_ret_token_is_its_own_row_in_and_out():
    model = tiny_model().eval()
    ret = model.ret_id
    assert ret == model.lm.vocab_size
    ids = torch.tensor([[0, 5, ret]])
    x = model.embed_ids(ids)  # (1, 3, D)
    torch.testing.assert_close(x[0, 2], model.ret_token_embed[0])
    torch.testing.assert_close(x[:, :2], model.lm.token_embeddings(ids[:, :2]))
    h = model.lm.run(x)
    logits = model.logits(h)
    assert logits.shape[-1] == ret + 1
    torch.testing.assert_close(logits[..., :ret], model.lm.logits(h))
    torch.testing.assert_close(logits[..., ret], (h @ model.ret_token_embed[0]))
    with pytest.raises(ValueError, match=rf"\[0, {ret}\]"):
        model.embed_ids(torch.tensor([[0, ret + 1]]))


@pytest.mark.parametrize("caption_ret", [False, True])
def test_loss_trains_caption_tokens_and_their_end_after_the_prefix(caption_ret):
    """Captions end in end-of-text (FROMAGe masks [RET] in captioning) or, with caption_ret, in [RET]."""
    model = tiny_model(caption_ret=caption_ret).eval()
    batch = model.example_batch(3, torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    loss, metrics = model.loss(batch)
    torch.manual_seed(5)
    texts = model.captions_for(batch)
    ids = model.encode_captions(texts)
    assert (ids == model.ret_id).sum(1).tolist() == [1, 1, 1]
    if not caption_ret:
        ids[ids == model.ret_id] = model.tokenizer.special_tokens["eos"]
    logits = model.caption_logits(batch["image"], ids)
    k = model.config.prefix_tokens
    pad = model.tokenizer.special_tokens["pad"]
    targets = ids[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits[:, k:-1][targets != pad], targets[targets != pad])
    assert metrics["caption_loss"] == pytest.approx(ce.item(), rel=1e-5)
    c = model.config
    want = (
        ce.item()
        + c.retrieval_weight * float(metrics["retrieval_loss"])
        + c.emission_weight * float(metrics["emission_loss"])
    )
    assert loss.item() == pytest.approx(want, rel=1e-5)


def test_contrastive_groups_hold_distinct_digits():
    model = tiny_model()
    labels = torch.tensor([3, 3, 1, 3, 1, 2])
    groups = model.contrastive_groups({"label": labels}, 6)
    assert [g.tolist() for g in groups] == [[0, 2, 5], [1, 4]]  # the third 3 is alone: no InfoNCE term
    assert all(len(set(labels[g].tolist())) == len(g) for g in groups)
    assert [g.tolist() for g in tiny_model(distinct_negatives=False).contrastive_groups({"label": labels}, 6)] == [
        list(range(6))
    ]


def test_prefix_carries_the_image_and_retrieval_reads_text_alone():
    model = tiny_model().eval()
    images, ids = model.example_inputs(2, torch.Generator().manual_seed(2))
    a = model(images, ids)
    b = model(images.flip(0), ids)
    assert not torch.allclose(a["logits"], b["logits"])  # the prefix depends on the image
    torch.testing.assert_close(a["text"], b["text"])  # the [RET] query does not see the image
    padded = torch.cat([ids, torch.full((2, 5), model.tokenizer.special_tokens["pad"])], dim=1)
    torch.testing.assert_close(model.text_embeddings(padded), a["text"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("bos_first", [True, False])
def test_generation_with_and_without_cache_agree(bos_first):
    model = tiny_model(bos_first=bos_first).eval()
    images, _ = model.example_inputs(3, torch.Generator().manual_seed(3))
    assert caption(model, images) == caption(model, images, use_cache=False)
    gallery, _ = model.example_inputs(6, torch.Generator().manual_seed(4))
    a = generate(model, "the digit", gallery=gallery, k=3)
    b = generate(model, "the digit", gallery=gallery, k=3, use_cache=False)
    assert a["text"] == b["text"] and torch.equal(a["retrieved"], b["retrieved"])
    ids = torch.tensor(
        [
            model.tokenizer.encode("the digit", add_bos=True, add_eos=False)
            + model.tokenizer.encode(a["text"], add_bos=False, add_eos=False)
            + [model.ret_id]
        ]
    )
    scores = model.image_embeddings(gallery) @ model.text_embeddings(ids)[0]
    torch.testing.assert_close(a["scores"], scores.topk(3).values, atol=1e-5, rtol=0)


@pytest.mark.parametrize("bos_first", [True, False])
def test_interleaved_prompt_matches_captioning(bos_first):
    model = tiny_model(bos_first=bos_first).eval()
    images, _ = model.example_inputs(2, torch.Generator().manual_seed(9))
    out = generate(model, "<image>", images=images[:1])
    assert out["text"] == caption(model, images[:1])[0] and "retrieved" not in out
    two = generate(model, "first <image> then <image> so", images=images, gallery=images, k=1)
    assert two["retrieved"].shape == (1,)
    with pytest.raises(ValueError, match="2 <image> token.*1 image"):
        generate(model, "<image> and <image>", images=images[:1])
    with pytest.raises(ValueError, match="0 <image> token.*2 image"):
        generate(model, "no marker", images=images)
    with pytest.raises(ValueError, match="1 <image> token.*0 image"):
        generate(model, "<image> alone")


def test_sampled_captions_follow_the_seed():
    model = tiny_model().eval()
    images, _ = model.example_inputs(4, torch.Generator().manual_seed(3))
    one = caption(model, images, temperature=1.5, seed=1)
    assert one == caption(model, images, temperature=1.5, seed=1)
    assert one != caption(model, images, temperature=1.5, seed=2)


def test_bad_input_names_expected_and_given():
    model = tiny_model().eval()
    with pytest.raises(ValueError, match=r"expected images \(B, 1, 4, 4\).*\(2, 1, 8, 8\)"):
        caption(model, torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"expected images \(B, 1, 4, 4\).*\(2, 3, 4, 4\)"):
        model.image_embeddings(torch.rand(2, 3, 4, 4))
    with pytest.raises(ValueError, match="rows \\[1\\] have none"):
        model.text_embeddings(torch.tensor([[0, 5, model.ret_id], [0, 5, 6]]))
    with pytest.raises(ValueError, match="non-empty list"):
        embed_texts(model, [])
    with pytest.raises(ValueError, match="cfg_scale"):
        sample_to_folder(model, "unused", prompt="a", cfg_scale=2.0)


def test_frozen_part_of_mismatched_width_is_refused():
    model = tiny_model()
    lm_spec = spec("lm")
    wide_lm = lm_spec.model_class(attrs.evolve(contracts.tiny_config(lm_spec.model_class, lm_spec.config), dim=24))
    with pytest.raises(ValueError, match=f"width {model.lm.dim}.*got width 24"):
        model.swap_parts(lm=wide_lm)
    clip_spec = spec("clip")
    tiny_clip = contracts.tiny_config(clip_spec.model_class, clip_spec.config)
    assert model.config.visual_feature == "cls"  # the adapter reads the ViT's [CLS] width
    wide_clip = clip_spec.model_class(attrs.evolve(tiny_clip, vision=tiny_clip.vision.with_block(dim=24)))
    with pytest.raises(ValueError, match=f"width {model.visual_dim}.*got width 24"):
        model.swap_parts(vision=wide_clip)
    assert model.vision.config.vision.dim == model.visual_dim  # the refused part was not kept
    embed_model = tiny_model(visual_feature="embed")
    with pytest.raises(ValueError, match=f"width {embed_model.visual_dim}.*got width 24"):
        embed_model.swap_parts(vision=clip_spec.model_class(attrs.evolve(tiny_clip, embed_dim=24)))
    same = clip_spec.model_class(tiny_clip)
    assert model.swap_parts(vision=same).vision is same
    with pytest.raises(ValueError, match="expected a language model"):
        model.swap_parts(lm=same)


def test_saved_folder_carries_its_parts(tmp_path):
    import polymodal

    model = tiny_model().eval()
    model.save(tmp_path / "m")
    assert (tmp_path / "m" / "lm" / "config.json").is_file() and (tmp_path / "m" / "vision" / "config.json").is_file()
    loaded = polymodal.load(tmp_path / "m")
    images, _ = model.example_inputs(2, torch.Generator().manual_seed(6))
    assert caption(loaded, images) == caption(model, images)
    assert loaded.tokenizer.encode("a seven") == model.tokenizer.encode("a seven")


def test_sample_folder_has_images_and_a_transcript(tmp_path):
    model = tiny_model().eval()
    gallery, _ = model.example_inputs(5, torch.Generator().manual_seed(7))
    paths = sample_to_folder(model, tmp_path / "r", n=3, prompt="the digit", gallery=gallery)
    names = sorted(p.name for p in paths)
    assert names == ["grid.png", "sample_000.png", "sample_001.png", "sample_002.png", "transcript.txt"]
    text = (tmp_path / "r" / "transcript.txt").read_text()
    assert "prompt: the digit" in text and "[RET]:" in text and text.count("gallery[") == 3
    paths = sample_to_folder(model, tmp_path / "c", n=2, gallery=gallery, seed=1)
    text = (tmp_path / "c" / "transcript.txt").read_text()
    assert text.startswith("captions:") and text.count("sample_00") == 2


def test_named_digits_reads_words_and_numerals():
    assert named_digits("a photo of the number seven") == {7}
    assert named_digits("a handwritten 7") == {7}
    assert named_digits("someone wrote 3 and five") == {3, 5}
    assert named_digits("a sevenish blob") == set()


def test_evaluate_reports_the_metrics():
    model = tiny_model().eval()
    metrics = model.evaluate(tiny_digits())
    for key in ("caption_accuracy", "retrieval_r1", "retrieval_r1_heldout", "ret_emission_rate"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["trainable_parameters"] == model.parameter_counts()["trainable_parameters"]
    assert metrics["samples"] == 24


def test_caption_command(tmp_path):
    from polymodal.cli import main
    from polymodal.eval.images import save_png

    model = tiny_model().eval()
    model.save(tmp_path / "m")
    images, _ = model.example_inputs(2, torch.Generator().manual_seed(8))
    files = [str(save_png(img, tmp_path / f"{i}.png")) for i, img in enumerate(images)]
    result = CliRunner().invoke(main, ["fromage", "caption", str(tmp_path / "m"), *files])
    assert result.exit_code == 0, result.output
    assert [line.split(": ")[0] for line in result.output.splitlines()] == files
    result = CliRunner().invoke(
        main, ["fromage", "retrieve", str(tmp_path / "m"), "the digit", "--gallery", str(tmp_path), "-k", "2"]
    )
    assert result.exit_code == 0, result.output
    assert "generated:" in result.output and result.output.count("cosine") == 2
    result = CliRunner().invoke(
        main,
        [
            "fromage",
            "retrieve",
            str(tmp_path / "m"),
            "<image> and <image>",
            "--gallery",
            str(tmp_path),
            "--image",
            files[0],
        ],
    )
    assert result.exit_code != 0 and "2 <image> token(s) but 1 image(s)" in result.output
    result = CliRunner().invoke(
        main,
        [
            "fromage",
            "retrieve",
            str(tmp_path / "m"),
            "<image> is a",
            "--gallery",
            str(tmp_path),
            "--image",
            files[0],
            "-k",
            "1",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "o" / "transcript.txt").read_text().startswith("prompt: <image> is a")
    # --out is a samples folder: a folder of the user's own files is refused before any work, nothing replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "transcript.txt").write_text("the user's")
    args = ["fromage", "retrieve", str(tmp_path / "m"), "the digit", "--gallery", str(tmp_path), "-k", "1"]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "mine")])
    assert result.exit_code != 0 and "did not write" in result.output
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["transcript.txt"]
    assert (tmp_path / "mine" / "transcript.txt").read_text() == "the user's"
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "o")])  # a rerun replaces its own files
    assert result.exit_code == 0, result.output
    assert (tmp_path / "o" / "transcript.txt").read_text().startswith("prompt: the digit")


def test_retrieve_out_writes_the_printed_result_without_generating_again(tmp_path, monkeypatch):
    from polymodal.cli import main
    from polymodal.eval.images import save_png
    from polymodal.plugins.fromage import infer, samples

    model = tiny_model().eval()
    model.save(tmp_path / "m")
    for i, img in enumerate(model.example_inputs(3, torch.Generator().manual_seed(8))[0]):
        save_png(img, tmp_path / "g" / f"{i}.png")
    calls, real = [], infer.generate

    def counted(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(infer, "generate", counted)
    monkeypatch.setattr(samples, "generate", counted)
    args = ["fromage", "retrieve", str(tmp_path / "m"), "the digit", "--gallery", str(tmp_path / "g"), "-k", "2"]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert calls == ["the digit"]  # one generation: printed and written
    transcript = (tmp_path / "o" / "transcript.txt").read_text().splitlines()
    printed = result.output.splitlines()
    assert transcript[1] == printed[0]  # "generated: …"
    shown = [line.split()[0] for line in printed[2:]]  # the gallery files, nearest first
    assert [line.split()[1] for line in transcript[4:]] == shown


@pytest.mark.parametrize("ret_layer", [-2, -1, 0, 1])
def test_ret_query_reads_the_chosen_lm_layer(ret_layer):
    model = tiny_model(ret_layer=ret_layer).eval()
    embeds = torch.randn(2, 5, model.lm.dim, generator=torch.Generator().manual_seed(3))  # (B, T, D)
    final, states = model.retrieval_hidden(embeds)
    _, hidden = model.lm.run(embeds, return_hidden=True)  # depth + 1 states, the last the final output
    expected = {-2: torch.cat(hidden[1:], dim=-1), -1: final}.get(
        ret_layer, hidden[ret_layer] if ret_layer >= 0 else None
    )
    torch.testing.assert_close(final, hidden[-1])
    assert states.shape[-1] == model.ret_head.in_features
    if ret_layer != -2:
        torch.testing.assert_close(states, expected)
    with pytest.raises(ValueError, match="ret_layer"):
        tiny_model(ret_layer=len(model.lm.stack.blocks) + 1)(*model.example_inputs(1))


def test_ret_row_starts_at_the_mean_lm_row():
    model = contracts.build("fromage", perturb=False)
    rows = model.lm.token_embeddings(torch.arange(model.lm.vocab_size)[None])[0]
    torch.testing.assert_close(model.ret_token_embed.detach(), rows.mean(0, keepdim=True))
    random_row = contracts.build("fromage", perturb=False, ret_init="random")
    assert not torch.allclose(random_row.ret_token_embed, rows.mean(0, keepdim=True))

"""OFA: the unified vocabulary, the task mixture, the encoder–decoder's caches and constraints, bad input, the command."""

from __future__ import annotations

import random
from collections import Counter

import attrs
import pytest
import torch
from click.testing import CliRunner

from polymodal.cli import main
from polymodal.data import load_dataset, shapes
from polymodal.data.boxes import bins_to_box
from polymodal.models.parts import PartConfig
from polymodal.nn import KVCache
from polymodal.plugins.ofa import OFA, OFAConfig
from polymodal.plugins.ofa import vocab as V
from polymodal.plugins.ofa.config import TASKS
from polymodal.plugins.ofa.evaluate import (
    caption_metrics,
    evaluate_ofa,
    parse_caption,
    scene_objects,
    two_object_share,
)
from polymodal.plugins.ofa.tasks import (
    TaskCollate,
    make_task_batch,
    mask_middle,
    move_scenes,
    objects_present,
    pick_task,
    split_rows,
)


@pytest.fixture(scope="module")
def model() -> OFA:
    torch.manual_seed(0)
    config = OFA.tiny_config(OFAConfig())
    return OFA(config).eval()


@pytest.fixture(scope="module")
def batch():
    return load_dataset("shapes").split("train").batch(list(range(8)))


def test_the_three_token_kinds_take_disjoint_id_ranges(model):
    v = model.vocab
    text, code, bins = (v.kind_mask(k) for k in ("text", "code", "bin"))
    assert not (text & code).any() and not (text & bins).any() and not (code & bins).any()
    assert int(code.sum()) == v.codes and int(bins.sum()) == v.bins
    assert not text[v.bos] and not text[v.pad] and text[v.eos]
    assert model.embed.num_embeddings == v.size  # one table embeds all three
    assert v.decode_text(v.text(" what colour is the red circle?")) == "what colour is the red circle?"


def test_the_recipe_restarts_its_schedule_where_the_stem_pre_stage_ends():
    """The mixture gets its own warm-up and cosine: the recipe's restart is the pre-stage's length (set by hand)."""
    from polymodal.plugins.ofa import SHAPES
    from polymodal.train import lr_at

    pre = SHAPES.config.stem_pretrain_steps
    assert pre > 0 and SHAPES.train.restarts == (pre,)
    assert lr_at(pre + SHAPES.train.warmup_steps - 1, SHAPES.train) == pytest.approx(SHAPES.train.lr)


def test_the_task_of_a_step_is_fixed_by_the_step_and_follows_the_weights():
    weights = OFAConfig().weights()
    assert [pick_task(weights, 0, s) for s in range(50)] == [pick_task(weights, 0, s) for s in range(50)]
    drawn = Counter(pick_task(weights, 0, s) for s in range(4000))
    for task, w in zip(TASKS, weights, strict=True):
        assert abs(drawn[task] / 4000 - w / sum(weights)) < 0.03, (task, drawn)
    only = tuple(1.0 if t == "ground" else 0.0 for t in TASKS)
    assert {pick_task(only, 0, s) for s in range(30)} == {"ground"}


def test_a_mixed_batch_shares_its_rows_out_by_the_weights_and_trains_every_task(model, batch):
    weights = OFAConfig().weights()
    assert split_rows(weights, 32, 0, 7) == split_rows(weights, 32, 0, 7)  # every rank agrees on a step
    totals = Counter()
    for step in range(400):
        counts = dict(split_rows(weights, 32, 0, step))
        assert sum(counts.values()) == 32
        for task, w in zip(TASKS, weights, strict=True):  # never more than one row off the exact share
            assert abs(counts.get(task, 0) - 32 * w / sum(weights)) < 1, (task, counts)
        totals.update(counts)
    for task, w in zip(TASKS, weights, strict=True):  # and exactly the share on average
        assert abs(totals[task] / (400 * 32) - w / sum(weights)) < 0.01, (task, totals)
    collated = TaskCollate(model.config, model.vocab, model.texts())(batch, 3)
    assert [p["task"] for p in collated["parts"]] == [t for t, _ in split_rows(weights, 8, 0, 3)]
    assert sum(len(p["instruction"]) for p in collated["parts"]) == 8
    loss, logs = model.loss(collated)
    assert torch.isfinite(loss) and {f"loss_{p['task']}" for p in collated["parts"]} <= set(logs)
    single = attrs.evolve(model.config, mixed_batches=False)
    one = TaskCollate(single, model.vocab, model.texts())(batch, 3)["parts"]
    assert len(one) == 1 and one[0]["task"] == pick_task(weights, 0, 3) and len(one[0]["instruction"]) == 8


def test_the_stem_pre_stage_trains_the_stem_alone_on_the_objects_each_scene_holds(batch):
    torch.manual_seed(0)
    tiny = OFA(attrs.evolve(OFA.tiny_config(OFAConfig()), stem_pretrain_steps=5))
    objects = objects_present(batch)
    for i, boxes in enumerate(batch["boxes"]):  # one class per colour × kind present, nothing else
        assert set(objects[i].nonzero().flatten().tolist()) == {b[4] * len(shapes.KINDS) + b[5] for b in boxes}
    collate = TaskCollate(tiny.config, tiny.vocab, tiny.texts())
    first = collate(batch, 4)["parts"]
    assert [p["task"] for p in first] == ["objects"] and torch.equal(first[0]["objects"], objects)
    assert "objects" not in {p["task"] for p in collate(batch, 5)["parts"]}  # step 5: the task mixture
    loss, logs = tiny.loss(collate(batch, 0))
    loss.backward()
    trained = {name.split(".")[0] for name, p in tiny.named_parameters() if p.grad is not None}
    assert trained == {"stem", "object_head"} and "loss_objects" in logs
    assert not hasattr(OFA(OFA.tiny_config(OFAConfig())), "object_head")  # off: no extra weights in the folder


def test_captioning_alone_trains_between_the_pre_stage_and_the_mixture(batch):
    config = attrs.evolve(OFA.tiny_config(OFAConfig()), stem_pretrain_steps=2, caption_first_steps=3)
    tiny = OFA(config)
    collate = TaskCollate(tiny.config, tiny.vocab, tiny.texts())
    assert [p["task"] for p in collate(batch, 1)["parts"]] == ["objects"]
    for step in (2, 3, 4):  # steps 2 … 4: one caption part holding every row
        (part,) = collate(batch, step)["parts"]
        assert part["task"] == "caption" and len(part["instruction"]) == len(batch["caption"])
    mixed = {p["task"] for p in collate(batch, 5)["parts"]}
    assert len(mixed) > 1 and "caption" in mixed  # step 5: every task
    assert [p["task"] for p in tiny.collator()(batch, 4)["parts"]] == ["caption"]
    loss, logs = tiny.loss(batch)  # a raw batch is collated as the mixture's first step, not the caption stage
    assert torch.isfinite(loss) and len([k for k in logs if k.startswith("loss_")]) > 1


def test_task_stages_follow_captioning_in_order_then_the_mixture(batch):
    config = attrs.evolve(
        OFA.tiny_config(OFAConfig()),
        stem_pretrain_steps=2,
        caption_first_steps=1,
        first_stages=["text_to_image:2", "caption+vqa:1"],  # a list, as JSON and --set give it
        text_to_image_weight=0.0,  # a stage that names a task weighted 0 still trains it
    )
    assert config.first_stages == ("text_to_image:2", "caption+vqa:1") and config.mixture_start == 6
    tiny = OFA(config)
    collate = TaskCollate(tiny.config, tiny.vocab, tiny.texts())
    tasks = {step: [p["task"] for p in collate(batch, step)["parts"]] for step in range(1, 7)}
    assert tasks[1] == ["objects"] and tasks[2] == ["caption"]
    assert tasks[3] == tasks[4] == ["text_to_image"] and tasks[5] == ["caption", "vqa"]
    assert len(tasks[6]) > 2 and "text_to_image" not in tasks[6]  # the mixture, at its own weights
    assert [p["task"] for p in tiny.collator()(batch, config.mixture_start)["parts"]] == tasks[6]
    tiny_again = OFA.tiny_config(attrs.evolve(OFAConfig(), first_stages=("text_to_image:500",)))
    assert tiny_again.first_stages == ("text_to_image:1",)


@pytest.mark.parametrize("stages", [("caption",), ("caption:0",), ("painting:10",), ("caption+:5",), "caption:5"])
def test_a_stage_that_is_not_tasks_and_steps_is_refused(stages):
    with pytest.raises(ValueError, match="TASK\\+TASK:STEPS"):
        OFAConfig(first_stages=stages)


def test_the_pre_stage_sees_its_scenes_mirrored_and_shifted_with_the_same_objects(batch):
    config = attrs.evolve(
        OFA.tiny_config(OFAConfig()), stem_pretrain_steps=5, stem_augment_flip=True, stem_augment_shift=4
    )
    vocab = OFA(config).vocab
    collate = TaskCollate(config, vocab, None)
    first, again = collate(batch, 2)["parts"][0], collate(batch, 2)["parts"][0]
    assert torch.equal(first["encoder_images"], again["encoder_images"])  # fixed by (seed, step): ranks agree
    assert not torch.equal(first["encoder_images"], collate(batch, 3)["parts"][0]["encoder_images"])
    images = first["encoder_images"]  # (8, 3, 32, 32)
    assert images.shape == batch["image"].shape and not torch.equal(images, batch["image"])
    for before, after in zip(batch["image"], images, strict=True):  # each a mirror and/or a shift by ≤ 4 px
        assert any(
            torch.equal(torch.roll(c, (dy, dx), (1, 2))[:, 4:-4, 4:-4], after[:, 4:-4, 4:-4])
            for c in (before, before.flip(-1))
            for dy in range(-4, 5)
            for dx in range(-4, 5)
        )
    assert torch.equal(first["objects"], objects_present(batch))  # the same objects, moved
    unmoved = attrs.evolve(OFA.tiny_config(OFAConfig()), stem_pretrain_steps=5)  # the moves are off by default
    plain = TaskCollate(unmoved, vocab, None)
    assert torch.equal(plain(batch, 0)["parts"][0]["encoder_images"], batch["image"])


def test_the_mixture_moves_its_scenes_and_makes_their_captions_and_questions_again(batch):
    moved = move_scenes(batch, True, 4, seed=0, step=9)
    again = move_scenes(batch, True, 4, seed=0, step=9)
    assert torch.equal(moved["image"], again["image"]) and moved["caption"] == again["caption"]  # (seed, step)
    assert not torch.equal(moved["image"], batch["image"]) and moved["boxes"] != batch["boxes"]
    for i, boxes in enumerate(moved["boxes"]):  # the text names the moved objects' places, not the old ones
        truth = scene_objects(boxes, 32)
        named = parse_caption(moved["caption"][i])
        assert set(named) == truth and len(named) == len(truth)
        answers = dict(moved["qa"][i])
        assert answers["how many objects are there?"] == str(len(boxes))
        for c, k, p in truth:
            where = shapes.WHERE[shapes.POSITIONS[p]]
            assert answers[f"what colour is the {shapes.KINDS[k]} {where}?"] == tuple(shapes.COLOURS)[c]
            assert answers[f"where is the {tuple(shapes.COLOURS)[c]} {shapes.KINDS[k]}?"] == shapes.POSITIONS[p]
    config = attrs.evolve(OFA.tiny_config(OFAConfig()), augment_flip=True, augment_shift=4)
    tiny = OFA(config)
    parts = TaskCollate(config, tiny.vocab, tiny.texts())(batch, 9)["parts"]
    assert torch.equal(torch.cat([p["image"] for p in parts]), moved["image"])  # every task's rows, moved alike
    plain = TaskCollate(OFA.tiny_config(OFAConfig()), tiny.vocab, tiny.texts())(batch, 9)["parts"]  # off by default
    assert torch.equal(torch.cat([p["image"] for p in plain]), batch["image"])


def test_every_task_batch_has_an_instruction_and_a_target_the_loss_reads(model, batch):
    for task in TASKS:
        out = make_task_batch(task, batch, model.vocab, model.config, model.texts(), random.Random(0))
        assert out["instruction"].shape[0] == 8
        assert ("target" in out) != ("code_target" in out)
        assert ("encoder_images" in out) == (task not in ("text_to_image", "classify"))
        loss, _ = model.loss(out)
        assert torch.isfinite(loss)


def test_a_grounding_target_is_the_box_as_four_location_tokens(model, batch):
    out = make_task_batch("ground", batch, model.vocab, model.config, None, random.Random(1))
    v, size = model.vocab, model.config.image_size
    for i, row in enumerate(out["target"].tolist()):
        assert row[4] == v.eos and all(t >= v.bin_offset for t in row[:4])
        box = bins_to_box(torch.tensor([[t - v.bin_offset for t in row[:4]]]), size, v.bins)[0]
        named = v.decode_text(out["instruction"][i])  # which region does the text " red circle " describe?
        match = [b for b in batch["boxes"][i] if f"{tuple(shapes.COLOURS)[b[4]]} {shapes.KINDS[b[5]]}" in named]
        assert match and (box - torch.tensor(match[0][:4], dtype=torch.float)).abs().max() <= size / (v.bins - 1) / 2


def test_a_region_question_carries_the_box_in_location_tokens(model, batch):
    out = make_task_batch("region", batch, model.vocab, model.config, None, random.Random(2))
    ids = out["instruction"]
    for row in ids.tolist():
        real = [t for t in row if t != model.vocab.pad]
        assert all(t >= model.vocab.bin_offset for t in real[-4:])
        assert not any(t >= model.vocab.bin_offset for t in real[:-4])


def test_infilling_blacks_out_the_middle_half_only():
    images = torch.rand(2, 3, 32, 32)
    masked = mask_middle(images)
    assert (masked[..., 8:24, 8:24] == 0).all()
    keep = torch.ones(32, 32, dtype=torch.bool)
    keep[8:24, 8:24] = False
    assert torch.equal(masked[..., keep], images[..., keep])


def test_infilling_is_scored_where_the_mask_cuts_the_object_and_on_the_colour_drawn_over_what_it_hid():
    from polymodal.plugins.ofa.evaluate import cut_objects, hidden_pixels, painted_colour

    test = load_dataset("shapes").split("test")
    idx = cut_objects(test, 1000)
    assert len(idx) >= 50 and all(len(test["boxes"][i]) == 1 for i in idx)
    original = test["image"][idx].float()
    drawn, hidden = hidden_pixels(original)
    share = hidden.sum((1, 2)) / drawn.sum((1, 2))
    assert ((share >= 0.1) & (share <= 0.9)).all()  # part of each object shows, part must be drawn again
    masked = mask_middle(original)
    assert (masked.amax(1) > 0.5).flatten(1).any(1).all()  # the input names the colour
    # the reading: the original's hidden pixels name its colour; a black middle names none; another scene's
    # middle names another colour (one scene in 33 shares it)
    colour = test["colour"][idx]
    assert torch.equal(painted_colour(original, hidden), colour)
    assert (painted_colour(masked, hidden) == -1).all()
    swapped = torch.where(mask_middle(torch.ones_like(original)) == 0, original.roll(1, 0), original)
    assert (painted_colour(swapped, hidden) == colour).float().mean() < 0.1


def test_cached_decoding_equals_the_full_teacher_forced_pass(model, batch):
    images, instruction = batch["image"][:2], torch.tensor([model.vocab.text(V.CAPTION)] * 2)
    ids = torch.randint(3, 300, (2, 7))
    ids[:, 0] = model.vocab.bos
    states, real = model.encode(images, instruction)
    full = model.decode(ids, states, real)  # (2, 7, V)
    cache = KVCache()
    steps = [model.decode(ids[:, :3], states, real, cache=cache)]
    steps += [model.decode(ids[:, t : t + 1], states, real, cache=cache) for t in range(3, 7)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.cross_entries == model.config.decoder_depth  # the context projected once, kept


def test_the_patch_block_s_2d_bias_reaches_the_encoder(model, batch):
    images, instruction = batch["image"][:1], torch.tensor([model.vocab.text(V.CAPTION)])
    before = model.encode(images, instruction)[0]
    with torch.no_grad():
        model.image_bias.embedding.weight.add_(1.0)  # a constant on the patch block only: softmax-invariant there
        same = model.encode(images, instruction)[0]
        model.image_bias.embedding.weight.sub_(1.0)
        model.image_bias.embedding.weight[0].add_(3.0)  # one offset changed: patch attention moves
        moved = model.encode(images, instruction)[0]
        model.image_bias.embedding.weight[0].sub_(3.0)
    assert not torch.allclose(before, same, atol=1e-6)  # the constant shifts patches against the text
    assert not torch.allclose(before, moved, atol=1e-6)


def test_outputs_stay_inside_the_task_vocabulary(model, batch):
    v = model.vocab
    images = batch["image"][:3]
    for row in model.run(images, [V.CAPTION] * 3, max_new_tokens=6):
        assert all(t < v.code_offset for t in row)  # a caption never writes a location token or a code
    for row in model.run(images, [V.GROUND.format(text="red circle")] * 3, kind="bin", max_new_tokens=5):
        assert all(t >= v.bin_offset for t in row)
    answers = ["red", "blue cross", "yes"]
    assert set(model.ask(images, ["what colour is it?"] * 3, candidates=answers)) <= set(answers)
    words = ["zero", "one"]
    assert set(model.classify_text(["We saw one chair."], words)) <= set(words)


def test_bad_input_is_refused_naming_expected_and_given(model, batch):
    images = batch["image"][:1]
    with pytest.raises(ValueError, match=r"max_instruction=\d+ .* got \d+"):
        model.run(images, [" what" * 200])
    with pytest.raises(ValueError, match=r"expected \(B, 3, 32, 32\).*got \(1, 3, 16, 16\)"):
        model.caption(torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match="beams: expected an integer >= 1; got 0"):
        model.run(images, [V.CAPTION], beams=0)
    with pytest.raises(ValueError, match=r"expected 0 <= x0 < x1 <= 32.*got \(20.0, 1.0, 10.0, 5.0\)"):
        model.region_question(images, torch.tensor([[20.0, 1, 10, 5]]), "colour", ["red"])
    with pytest.raises(ValueError, match=r"expected 0 <= x0 < x1 <= 32.*got \(0.0, 0.0, 40.0, 5.0\)"):
        model.region_question(images, torch.tensor([[0.0, 0, 40, 5]]), "colour", ["red"])


def test_two_object_scores_show_a_model_that_swaps_places_between_objects():
    test = load_dataset("shapes").split("test")
    idx = list(range(40))
    pairs = sum(len(test["boxes"][i]) == 2 for i in idx)
    assert 0 < pairs < len(idx)

    class SwapsPlaces:  # names every object right, with its place right alone and the other's place in pairs
        def caption(self, images):
            out = []
            for image in images:
                i = next(j for j in idx if torch.equal(test["image"][j], image))
                objects = sorted(scene_objects(test["boxes"][i], 32))
                places = [p for _, _, p in objects][::-1]
                out.append(
                    shapes.describe([(c, k, p) for (c, k, _), p in zip(objects, places)], "a {colour} {kind} {where}")
                )
            return out

    got = caption_metrics(SwapsPlaces(), test, idx, 32)
    objects = len(idx) + pairs
    assert got["caption_colour_kind"] == 1.0 and got["caption_position_two"] == 0.0
    assert got["caption_position"] == pytest.approx((len(idx) - pairs) / objects)
    assert two_object_share("x", [(True, False), (False, True), (True, True)]) == {"x_two": 0.5}
    assert two_object_share("x", [(True, False)]) == {}


def test_a_caption_is_parsed_into_the_objects_it_names():
    named = parse_caption("a red circle in the top left and one blue cross placed at the bottom")
    red, circle, blue, cross = 0, 1, 2, 3
    assert named == [(red, circle, 0), (blue, cross, 7)]
    assert parse_caption("nothing here") == [(-1, -1, -1)]
    assert scene_objects([(1, 1, 9, 9, red, circle), (12, 24, 20, 31, blue, cross)], 32) == {
        (red, circle, 0),
        (blue, cross, 7),
    }


def test_the_ask_command_answers_and_grounds(model, tmp_path, batch):
    folder = tmp_path / "ofa"
    model.save(folder)
    image = tmp_path / "scene.png"
    from polymodal.eval.images import save_png

    save_png(batch["image"][0], image)
    run = CliRunner().invoke
    result = run(main, ["ofa", "ask", str(folder), str(image), "what colour is the square?"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "box.png"
    result = run(main, ["ofa", "ask", str(folder), str(image), "--ground", "red circle", "--out", str(out)])
    if result.exit_code == 0:  # an untrained tiny model may not write a box: then it says so
        assert "box (x0, y0, x1, y1)" in result.output and out.exists()
    else:
        assert "did not write four location tokens" in result.output
    out.write_bytes(b"mine")
    result = run(main, ["ofa", "ask", str(folder), str(image), "--ground", "red circle", "--out", str(out)])
    assert result.exit_code != 0 and "already exists" in result.output and out.read_bytes() == b"mine"
    result = run(main, ["ofa", "ask", str(folder), str(image)])
    assert result.exit_code != 0 and "INSTRUCTION or --ground" in result.output


def test_the_tiny_model_round_trips_through_its_folder(model, tmp_path, batch):
    import polymodal

    model.save(tmp_path / "m")
    loaded = polymodal.load(tmp_path / "m")
    args = model.example_inputs(2)
    torch.testing.assert_close(loaded(*args), model(*args))
    assert isinstance(loaded.config.tokenizer, PartConfig)


def test_the_folder_keeps_the_text_tokenizer_it_was_trained_with(model, tmp_path):
    import polymodal
    from polymodal.data.tokenizers import CONFIG_FILE

    model.save(tmp_path / "m")
    assert (tmp_path / "m" / CONFIG_FILE).is_file()
    loaded = polymodal.load(tmp_path / "m")
    text = ' which region does the text " magenta cross " describe?'
    assert loaded.vocab.text(text) == model.vocab.text(text)
    assert loaded.vocab.tokenizer is not model.vocab.tokenizer  # read from the folder, not relearnt


def test_sample_draws_images_for_a_caption(model, tmp_path):
    model.save(tmp_path / "m")
    out = tmp_path / "samples"
    args = ["sample", str(tmp_path / "m"), "--prompt", "a red circle in the center", "-n", "2", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert (out / "sample_000.png").is_file() and (out / "sample_001.png").is_file()
    result = CliRunner().invoke(main, ["sample", str(tmp_path / "m"), "-n", "2", "--out", str(tmp_path / "s2")])
    assert result.exit_code != 0 and "--prompt" in result.output


def test_evaluation_can_score_a_subset_of_the_tasks(model):
    shapes_data = load_dataset("shapes")
    assert set(evaluate_ofa(model, shapes_data, tasks=("classify",))) == {"classify_accuracy"}
    got = evaluate_ofa(model, shapes_data, tasks=("vqa", "ground"))
    assert {"vqa_accuracy", "ground_accuracy", "region_accuracy"} <= set(got) and "caption_accuracy" not in got
    with pytest.raises(ValueError, match="unknown tasks.*detect"):
        evaluate_ofa(model, shapes_data, tasks=("detect",))


def test_a_mixed_batch_costs_two_passes_and_padding_across_tasks_changes_no_task_s_loss(model):
    from polymodal.plugins.ofa.objective import mixed_task_loss

    rows = load_dataset("shapes").split("train").batch(list(range(16)))
    parts = TaskCollate(model.config, model.vocab, model.texts())(rows, 5)["parts"]
    assert {p["task"] for p in parts} >= {"caption", "text_to_image", "classify"}  # both groups, long and short targets
    passes = []
    hook = model.encoder.register_forward_hook(lambda *_: passes.append(1))
    try:
        whole, logs = mixed_task_loss(model, parts)
    finally:
        hook.remove()
    assert len(passes) == 2  # the parts that show an image, then the image-free ones
    alone = [mixed_task_loss(model, [p])[0] for p in parts]
    for p, loss in zip(parts, alone, strict=True):
        assert torch.allclose(logs[f"loss_{p['task']}"], loss, atol=1e-5), p["task"]
    expected = sum(len(p["instruction"]) / 16 * loss for p, loss in zip(parts, alone, strict=True))
    assert torch.allclose(whole, expected, atol=1e-5)

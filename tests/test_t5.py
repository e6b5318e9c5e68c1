"""The t5 family: span corruption (hypothesis), the tokenizer, the text-encoder interface, the contracts, folders and
parity with transformers' T5 / mT5 through ``polymodal convert --from transformers-t5``."""

from __future__ import annotations

import attrs
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

import polymodal
from polymodal.cli import main
from polymodal.data import languages, load_dataset
from polymodal.io import LoadError
from polymodal.models import interfaces
from polymodal.plugins.t5 import T5Config, T5Model
from polymodal.plugins.t5.convert import convert_transformers_t5
from polymodal.plugins.t5.corruption import (
    corrupt,
    noise_counts,
    noise_mask,
    recaption,
    sentinel_ids,
)
from polymodal.testing import contracts

pytestmark = pytest.mark.usefixtures("one_thread")

SENTINELS = list(range(1000, 1016))
EOS = 1


def _tiny(**changes) -> T5Model:
    torch.manual_seed(0)
    return T5Model(attrs.evolve(T5Model.tiny_config(T5Config()), **changes)).eval()


# -- span corruption -------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(20, 999), min_size=2, max_size=120),
    st.sampled_from([0.15, 0.3, 0.5]),
    st.sampled_from([1.0, 3.0, 5.0]),
    st.integers(0, 2**31 - 1),
)
def test_corruption_reassembles_with_sentinels_in_order(ids, density, span, seed):
    g = torch.Generator().manual_seed(seed)
    num_noise, spans = noise_counts(len(ids), density, span)
    if spans + 1 > len(SENTINELS):
        return
    inputs, target = corrupt(ids, SENTINELS, EOS, noise_density=density, mean_span=span, generator=g)
    assert inputs[-1] == EOS and target[-1] == EOS
    used_in = [t for t in inputs if t in SENTINELS]
    used_out = [t for t in target if t in SENTINELS]
    k = len(used_in)
    assert k >= 1 and used_in == SENTINELS[:k]  # at least one span, sentinels in order
    assert used_out == SENTINELS[: k + 1]  # the target ends with the final sentinel
    assert target[0] == SENTINELS[0]
    # reassemble: each input sentinel replaced by the tokens after it in the target
    spans_out, current = {}, None
    for t in target[:-1]:
        if t in SENTINELS:
            current = t
            spans_out[t] = []
        else:
            spans_out[current].append(t)
    assert spans_out[SENTINELS[k]] == []
    rebuilt = [x for t in inputs[:-1] for x in (spans_out[t] if t in SENTINELS else [t])]
    assert rebuilt == ids
    dropped = sum(len(v) for v in spans_out.values())
    assert dropped == num_noise and 1 <= dropped <= len(ids) - 1
    assert abs(dropped - len(ids) * density) <= 0.5 or dropped in (1, len(ids) - 1)  # density ≈ target
    assert all(len(v) >= 1 for key, v in spans_out.items() if key != SENTINELS[k])  # no empty span


def test_noise_density_and_span_length_average_to_the_targets():
    g = torch.Generator().manual_seed(0)
    masks = [noise_mask(100, 0.15, 3.0, g) for _ in range(200)]
    density = sum(map(sum, masks)) / (100 * len(masks))
    runs = [sum(1 for i, m in enumerate(mask) if m and (i == 0 or not mask[i - 1])) for mask in masks]
    assert density == pytest.approx(0.15, abs=0.005)
    assert sum(map(sum, masks)) / sum(runs) == pytest.approx(3.0, rel=0.05)
    assert all(not mask[0] for mask in masks)  # T5: non-noise first


def test_every_training_caption_gets_a_span():
    model = T5Model(T5Config())
    captions = list(load_dataset("shapes-multilingual").train["caption"])
    batch = model.corrupt(captions[:300], generator=torch.Generator().manual_seed(0))
    sentinels = torch.tensor(sentinel_ids(model.tokenizer))
    assert bool(torch.isin(batch["input_ids"], sentinels).any(1).all())
    real = batch["targets"] >= 0
    assert torch.equal(batch["decoder_ids"][:, 1:][real[:, 1:]], batch["targets"][:, :-1][real[:, 1:]])
    assert bool((batch["decoder_ids"][:, 0] == model.pad_id).all())


def test_training_reads_no_evaluation_only_pair_and_draws_fresh_corruptions():
    data = load_dataset("shapes-multilingual")
    model = T5Model(T5Config())
    collate = model.collator()
    held = set(languages.heldout_pairs("shapes"))
    batch = data.train.batch(list(range(64)))
    torch.manual_seed(0)
    first, second = collate(batch, 0), collate(batch, 1)
    assert not torch.equal(first["input_ids"][:, :5], second["input_ids"][:, :5])  # a fresh draw each step
    # every re-captioned text is a training pair: it is exactly what a training template writes
    torch.manual_seed(3)
    texts = recaption(batch, "shapes-multilingual")
    assert texts == first["texts"] or texts != first["texts"]  # drawn from the global generator
    training = {
        languages.shapes_caption(lang, t, objs)
        for objs in _objects(batch)
        for lang in languages.LANGUAGES
        for t in languages.template_ids("shapes", lang)
    }
    heldout = {languages.shapes_caption(lang, t, objs) for objs in _objects(batch) for t, lang in held}
    assert set(first["texts"]) <= training and not set(first["texts"]) & heldout
    with pytest.raises(ValueError, match="evaluation-only"):
        collate(data.test.batch(list(range(16))), 0)


def _objects(batch):
    from polymodal.data.multilingual import scene_objects

    return scene_objects({"boxes": batch["boxes"]}, int(batch["image"].shape[-1]))


# -- tokenizer and interface -----------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(st.text(min_size=0, max_size=40))
def test_any_utf8_text_encodes_and_decodes(text):
    model = _tiny()
    ids = model.tokenize(text)
    assert ids.shape[0] == 1 and int(ids[0, ids[0] != model.pad_id][-1]) == model.tokenizer.special_tokens["eos"]
    assert model.tokenizer.decode(ids[0]) == text


def test_truncation_is_said():
    model = _tiny()
    long = "красный круг " * 80
    with pytest.raises(ValueError, match=f"limit of {model.config.max_len}"):
        model.tokenize(["a", long])
    ids, cut = model.tokenize(["a", long], truncate=True, return_truncated=True)
    assert ids.shape == (2, model.config.max_len) and cut.tolist() == [False, True]
    assert int(ids[1, -1]) == model.tokenizer.special_tokens["eos"]


def test_text_token_encoder_interface():
    model = _tiny()
    interfaces.require(model, interfaces.TextTokenEncoder, what="kandinsky text encoder")
    ids = model.tokenize(["a red circle", "红色的圆形在左边", "un carré"])
    pooled, tokens, mask = model.encode_text_and_tokens(ids)
    assert pooled.shape == (3, 16) and tokens.shape == (*ids.shape, 16) and torch.equal(mask, ids != model.pad_id)
    expected = torch.stack([tokens[i][mask[i]].mean(0) for i in range(3)])
    torch.testing.assert_close(pooled, expected)
    alone = model.encode_text_and_tokens(ids[:1, : int(mask[0].sum())])[0]  # padding changes nothing
    torch.testing.assert_close(alone, pooled[:1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.zeros(3, dtype=torch.long), r"expected integer token ids \(B, L\); got \(3,\)"),
        (torch.zeros(1, 4), r"got \(1, 4\) torch.float32"),
        (torch.full((1, 4), 9999), r"must lie in \[0, 300\); got \[9999, 9999\]"),
        (torch.ones(1, 999, dtype=torch.long), r"at most max_len=128 tokens; got 999"),
    ],
)
def test_bad_ids_are_refused_naming_expected_and_given(bad, match):
    with pytest.raises(ValueError, match=match):
        _tiny().encode_text_and_tokens(bad)


def test_an_encoder_alone_has_no_decoder_to_run():
    model = _tiny(decoder_depth=0)
    with pytest.raises(ValueError, match="decoder_depth=0"):
        model(torch.ones(1, 3, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long))


# -- contracts and folders -------------------------------------------------------------------------
@pytest.mark.parametrize("check", contracts.MODEL_CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_model_contracts(check):
    check("t5-multilingual")


def test_folder_round_trip(tmp_path):
    model = _tiny()
    model.save(tmp_path / "m")
    again = polymodal.load(tmp_path / "m")
    ids = model.tokenize(["зелёный квадрат", "a cyan cross"])
    assert torch.equal(again.tokenize(["зелёный квадрат", "a cyan cross"]), ids)
    for a, b in zip(model.encode_text_and_tokens(ids), again.encode_text_and_tokens(ids)):
        assert torch.equal(a, b)


# -- parity with transformers ----------------------------------------------------------------------
transformers = pytest.importorskip("transformers")


def _randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if name.endswith("layer_norm.weight") else 0.0) + 0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


def _reference(tmp_path, cls, config_cls, **over):
    cfg = dict(
        vocab_size=61,
        d_model=32,
        d_kv=8,
        num_heads=4,
        d_ff=48,
        num_layers=2,
        num_decoder_layers=3,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        dropout_rate=0.0,
    )
    hf = _randomise(cls(config_cls(**{**cfg, **over})), 0)
    hf.save_pretrained(tmp_path / "hf")
    return cls.from_pretrained(tmp_path / "hf").eval(), tmp_path / "hf"


def _ids():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 61, (3, 11), generator=g)  # (B, L)
    ids[1, 7:] = 0
    dec = torch.randint(2, 61, (3, 5), generator=g)  # (B, T)
    dec[:, 0] = 0
    return ids, (ids != 0).long(), dec


@pytest.mark.parametrize(
    "cls, ff",
    [("T5EncoderModel", "gated-gelu"), ("T5EncoderModel", "relu"), ("MT5EncoderModel", "gated-gelu")],
)
def test_encoder_parity_with_transformers(tmp_path, cls, ff):
    config_cls = transformers.MT5Config if cls.startswith("MT5") else transformers.T5Config
    hf, folder = _reference(tmp_path, getattr(transformers, cls), config_cls, feed_forward_proj=ff)
    name = "transformers-mt5" if cls.startswith("MT5") else "transformers-t5"
    result = CliRunner().invoke(main, ["convert", "--from", name, str(folder), str(tmp_path / "ours")])
    assert result.exit_code == 0, result.output
    ours = polymodal.load(tmp_path / "ours")
    assert ours.config.decoder_depth == 0
    ids, mask, _ = _ids()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, D)
        got = ours.encode_text_and_tokens(ids)[1]
        err = (ref - got)[mask.bool()].abs().max().item()
        assert err < 1e-4, err
        ours.encoder.blocks[1].mlp.fc2.weight.data[0, 0] += 0.5  # the check can fail
        assert (ref - ours.encode(ids)[0])[mask.bool()].abs().max().item() > 1e-3


@pytest.mark.parametrize(
    "cls, ff", [("T5ForConditionalGeneration", "relu"), ("MT5ForConditionalGeneration", "gated-gelu")]
)
def test_encoder_decoder_parity_with_transformers(tmp_path, cls, ff):
    config_cls = transformers.MT5Config if cls.startswith("MT5") else transformers.T5Config
    hf, folder = _reference(tmp_path, getattr(transformers, cls), config_cls, feed_forward_proj=ff)
    ours = convert_transformers_t5(folder, tmp_path / "ours")
    assert ours.config.decoder_depth == 3
    ids, mask, dec = _ids()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
        assert (ref.encoder_last_hidden_state - ours.encode(ids)[0])[mask.bool()].abs().max().item() < 1e-4
        err = (ref.logits - ours(ids, dec)).abs().max().item()
        assert err < 1e-4 * max(1.0, ref.logits.abs().max().item()), err


def test_a_head_width_other_than_dim_over_heads_is_refused(tmp_path):
    _, folder = _reference(tmp_path, transformers.MT5EncoderModel, transformers.MT5Config, d_kv=16)
    with pytest.raises(LoadError, match=r"num_heads=4 × d_kv=16 = 64, d_model=32"):
        convert_transformers_t5(folder)

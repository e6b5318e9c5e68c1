"""Configs: validation messages, JSON round trip, overrides, docs on every field."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from polymodal.config import apply_overrides, from_json, to_json
from polymodal.nn import BlockConfig
from polymodal.nn.encoders import ViTEncoderConfig
from polymodal.plugins.vit import ViTConfig
from polymodal.train import TrainConfig


def test_invalid_value_names_field_and_range():
    with pytest.raises(ValueError, match=r"ViTEncoderConfig\.depth must be in \[1, 1024\], got 0"):
        ViTEncoderConfig(depth=0)
    with pytest.raises(ValueError, match=r"BlockConfig\.norm must be one of 'layernorm', 'rmsnorm'; got 'batchnorm'"):
        BlockConfig(norm="batchnorm")
    with pytest.raises(ValueError, match=r"heads must divide dim; got dim=10, heads=4"):
        BlockConfig(dim=10, heads=4)
    with pytest.raises(ValueError, match=r"must be an integer, got 2.5"):
        TrainConfig(steps=2.5)


def test_configs_are_frozen_and_evolve():
    cfg = ViTEncoderConfig()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        cfg.depth = 3
    assert attrs.evolve(cfg, depth=8).depth == 8 and cfg.with_block(dim=128).dim == 128


@settings(max_examples=30, deadline=None)
@given(
    dim=st.sampled_from([16, 32, 64]),
    depth=st.integers(1, 12),
    act=st.sampled_from(["gelu", "quick_gelu", "swiglu"]),
    classes=st.integers(0, 1000),
    eps=st.floats(1e-12, 1e-3),
)
def test_json_round_trip(dim, depth, act, classes, eps):
    block = BlockConfig(dim=dim, act=act, norm_eps=eps)
    cfg = ViTConfig(encoder=ViTEncoderConfig(block=block, depth=depth), num_classes=classes)
    assert from_json(ViTConfig, to_json(cfg)) == cfg


def test_unknown_json_key_lists_known_fields():
    with pytest.raises(ValueError, match="unknown ViTConfig field"):
        from_json(ViTConfig, '{"num_clases": 3}')


def test_overrides_reach_nested_fields_and_parse_json_values():
    cfg = apply_overrides(
        ViTConfig(), ["encoder.block.dim=32", "encoder.block.heads=2", "encoder.depth=3", "num_classes=3", "pool=mean"]
    )
    assert (cfg.encoder.dim, cfg.encoder.block.heads, cfg.encoder.depth, cfg.num_classes, cfg.pool) == (
        32,
        2,
        3,
        3,
        "mean",
    )
    with pytest.raises(ValueError, match=r"--set encoder.width=3: unknown field 'encoder.width'"):
        apply_overrides(ViTConfig(), ["encoder.width=3"])
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides(ViTConfig(), ["oops"])


@pytest.mark.parametrize("cls", [ViTConfig, ViTEncoderConfig, BlockConfig, TrainConfig])
def test_every_field_is_documented(cls):
    for a in attrs.fields(cls):
        assert a.metadata.get("doc"), f"{cls.__name__}.{a.name} has no doc"

"""``polymodal.nn.eval_mode``: eval mode for a block, each module's own mode back after it."""

from __future__ import annotations

import attrs
import pytest
from torch import nn

from polymodal.models import PolymodalModel
from polymodal.nn import eval_mode


@attrs.define
class _Config:
    pass


class _WithFrozenPart(PolymodalModel):
    config_class = _Config
    frozen = ("tokenizer",)

    def __init__(self) -> None:
        super().__init__(_Config())
        self.tokenizer = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
        self.head = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
        self.freeze()


def _modes(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


@pytest.mark.parametrize("training", [True, False])
def test_mode_restored_after_the_block(training: bool) -> None:
    model = _WithFrozenPart().train(training)
    before = _modes(model)
    with eval_mode(model):
        assert not any(_modes(model).values())
    assert _modes(model) == before
    assert not model.tokenizer.training  # the frozen part stays in eval mode in a training model too


def test_mode_restored_after_an_exception() -> None:
    model = _WithFrozenPart().train()
    before = _modes(model)
    with pytest.raises(RuntimeError, match="boom"), eval_mode(model):
        raise RuntimeError("boom")
    assert model.training and model.head.training and not model.tokenizer.training
    assert _modes(model) == before


def test_several_modules_each_get_their_own_mode_back() -> None:
    a, b = nn.Linear(2, 2).train(), nn.Linear(2, 2).eval()
    with eval_mode(a, b):
        assert not a.training and not b.training
    assert a.training and not b.training


def test_rejects_what_is_not_a_module() -> None:
    with pytest.raises(ValueError, match="torch.nn.Module"):
        with eval_mode(object()):  # type: ignore[arg-type]
            pass

"""Shared test setup: strict plugins (a broken plugin fails the suite), small thread count."""

from __future__ import annotations

import os

os.environ.setdefault("POLYMODAL_STRICT_PLUGINS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield

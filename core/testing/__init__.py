"""Testing kit: hypothesis strategies and contract tests over every registered component.

``polymodal.testing.strategies``  hypothesis strategies (image and token batches, attention
calls, valid config variants). ``polymodal.testing.contracts``  checks every model must pass,
``polymodal.testing.components`` those of encoders, backends, datasets, configs and Protocols; ``tests/test_contracts.py`` runs them over
the whole registry, so a new plugin is tested on arrival. ``polymodal.testing.ranks``  ``run_ranks(fn, world=2)``: a
function on several gloo processes, for testing a loss or a wrapper against one process.

Both are imported on demand (``from polymodal.testing import contracts``): hypothesis is a
test dependency, not a runtime one.
"""

from __future__ import annotations

from typing import Any

__all__ = ["components", "contracts", "ranks", "strategies"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

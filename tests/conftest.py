"""Shared test setup: strict plugins (a broken plugin fails the suite), small thread count."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("POLYMODAL_STRICT_PLUGINS", "1")
# The benchmark suites live in benchmarks/, outside the package; their tests import them from there.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import pytest  # noqa: E402
import torch  # noqa: E402

SUITE_THREADS = 1
"""Torch threads of the whole run, set before any test: the models the suite trains (and so its quality bars)
come out the same whichever tests run, alone or in the full run, on any number of cores (a thread count
changes float sums, and the digits recipes sit near their bars); one thread is also the faster choice for
these tiny tensors on a 2-core machine, and under ``-n 2`` each worker keeps to its own core (two threads per
worker would wait on each other: the ddpm recipe took over 25 min so, against about 5 on one thread). A test
may change it; it is restored after each test."""
torch.set_num_threads(SUITE_THREADS)


@pytest.fixture(autouse=True)
def _threads():
    yield
    if torch.get_num_threads() != SUITE_THREADS:  # a CLI call with --threads, or a test's own setting
        torch.set_num_threads(SUITE_THREADS)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """Train a registered model's default recipe once per test run; returns its folder and metrics.

    ``trained("vit")`` runs exactly what ``polymodal train vit --threads 1`` runs (default data, steps and
    seed; one thread, SUITE_THREADS) and caches the result for every test in the session.
    A variant whose config names pretrained parts (``spec.parts()``: ImageBind's ``[("clip", "clip")]``,
    DALL·E's ``[("tokenizer", "vqvae")]``) gets each part from this same cache, as ``--set field=FOLDER``
    (``trained("imagebind")`` reuses ``trained("clip")``), so each default model trains once per run.

    Under pytest-xdist (``-n 2``) the cache is shared by the workers: the first to need a model trains it
    into the run's common temporary folder while holding that model's file lock, and writes ``done.json``
    (its metrics) last; a worker that needs it meanwhile waits on the lock and then reads the folder, so the
    model still trains once per run. A model's parts are resolved before its own lock is taken (no lock is
    held while another is awaited).
    """
    import json

    from polymodal.api import spec, train_model
    from polymodal.io.cache import entry_lock

    worker = os.environ.get("PYTEST_XDIST_WORKER")  # gw0, gw1, … under ``-n``; unset in a plain run
    shared = tmp_path_factory.getbasetemp().parent if worker else tmp_path_factory.getbasetemp()
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            parts = tuple(f"{field}={get(variant)[0]}" for field, variant in spec(name).parts())
            out, done = shared / f"trained-{name}", shared / f"trained-{name}" / "done.json"
            with entry_lock(out):  # the cache's own waiting lock: a worker needing it meanwhile waits here
                if done.is_file():
                    metrics = json.loads(done.read_text())
                else:
                    _, metrics = train_model(name, out=out, set_=parts, progress=False, overwrite=True)
                    done.write_text(json.dumps(metrics))
                    metrics = json.loads(done.read_text())  # the same values whichever worker trained it
            cache[name] = (out, metrics)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def one_thread():
    """Run a module on one torch thread (tiny tensors: faster, and immune to a busy machine)."""
    prior = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prior)


INDEPENDENT_SLOW_FILES = ("test_vit_quality.py",)
"""Slow files that take minutes and need no other file's trained model: they run before the other slow files.
pytest-xdist's loadfile hands each worker its next file in advance and never moves it, so a long file late in the
order can wait behind another long one while the other worker idles — measured on CI's 2-core machine:
``test_vit_quality.py`` (6 min) queued behind ``test_unclip_quality.py`` kept one worker idle for 12 minutes."""


def pytest_collection_modifyitems(config, items):
    """Files with slow (training) tests first, each file's tests in their own order: under ``-n`` the
    longest work starts first and the quick files fill the workers' gaps at the end (longest-first
    scheduling; ``--no-loadscope-reorder`` in pyproject.toml keeps pytest-xdist from putting the files with
    the most tests first instead); the order is the same in every worker, as pytest-xdist requires."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}

    def rank(item) -> int:
        return 0 if item.path.name in INDEPENDENT_SLOW_FILES else 1 if item.path in slow_files else 2

    items.sort(key=rank)  # stable: files and tests keep their order

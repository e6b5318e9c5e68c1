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


SLOW_FILE_ORDER = (
    "test_kandinsky21_quality.py",  # the longest chain: CLIP-shapes → M-CLIP, MoVQ → 2.1, then 2.0 for its comparison
    "test_unclip_quality.py",  # CLIP, the VQ-VAE and DALL·E it compares with, SR3, and the two unCLIPs it trains
    "test_dalle_quality.py",
    "test_diffusion_quality.py",
    "test_clip_quality.py",
    "test_vit_quality.py",
)
"""Slow files that run first, in this order; the other slow files follow, then the quick ones. Longest work first,
with each chain of parts kept in one file so the other worker rarely waits on a lock: on CI's 2-core machine
(2026-12-06, one run's timeline) the Kandinsky 2.1 file took 26 min (with 2.0 trained for its comparison), unCLIP's
17, DALL·E's 17, the diffusion bars' 13; in alphabetical order unCLIP's came last and kept one worker busy six
minutes after the other had run out of work."""


def pytest_collection_modifyitems(config, items):
    """Files with slow (training) tests first — :data:`SLOW_FILE_ORDER`, then the other slow files —, each file's
    tests in their own order: under ``-n`` the longest work starts first and the quick files fill the workers'
    gaps at the end (longest-first scheduling; ``--no-loadscope-reorder`` in pyproject.toml keeps pytest-xdist
    from putting the files with the most tests first instead); the order is the same in every worker, as
    pytest-xdist requires."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}

    def rank(item) -> int:
        if item.path.name in SLOW_FILE_ORDER:
            return SLOW_FILE_ORDER.index(item.path.name)
        return len(SLOW_FILE_ORDER) + (0 if item.path in slow_files else 1)

    items.sort(key=rank)  # stable: files and tests keep their order


try:
    from xdist.scheduler import LoadFileScheduling
except ImportError:  # pytest-xdist absent: a plain serial run
    LoadFileScheduling = None


class _FileAtTheLastTest(LoadFileScheduling or object):
    """pytest-xdist's ``loadfile``, except that a worker is handed its next file only when its current file is down
    to its last test (a worker needs the next test in hand to start one), not at two tests left and two files at
    the start: a file handed out early waits behind its worker's long test while the other worker may idle."""

    def _reschedule(self, node) -> None:
        if node.shutting_down:
            return
        if not self.workqueue:
            node.shutdown()
            return
        if self._pending_of(self.assigned_work[node]) > 1:
            return
        self._assign_work_unit(node)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile`` (pyproject.toml) with :class:`_FileAtTheLastTest`; xdist's own scheduler otherwise, or
    when its internals are not the ones this relies on."""
    needed = ("_pending_of", "_assign_work_unit", "_reschedule")
    if config.getvalue("dist") != "loadfile" or not all(hasattr(LoadFileScheduling, n) for n in needed):
        return None
    return _FileAtTheLastTest(config, log)

"""Data-parallel training on several processes (gloo on the CPU): DDP and FSDP2 reach the weights one
process reaches, the ``--nproc`` launcher, a killed rank, two torchrun agents as two machines, and the
global-batch arithmetic.

Every multi-process run here is a subprocess with a ``timeout=`` and a process-group timeout
(``POLYMODAL_DIST_TIMEOUT_S``), so a broken collective fails the test instead of hanging it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import polymodal
from polymodal.cli import main
from polymodal.config import apply_overrides
from polymodal.data import load_digits
from polymodal.testing.ranks import free_port
from polymodal.train import TrainConfig, train
from polymodal.train.checkpoint import checkpoint_meta
from polymodal.train.distributed import DistributedContext, init_from_env, wrap

TINY = [
    "encoder.block.dim=32",
    "encoder.depth=2",
    "encoder.block.heads=2",
    "encoder.block.mlp_ratio=2.0",
    "encoder.block.drop_path=0.0",  # stochastic layers and augmentation off: the runs must agree exactly
    "augment_shift=0",
]
RUN = {"steps": 4, "batch_size": 16, "warmup_steps": 1}
TIMEOUT = 150  # seconds any subprocess may take before the test fails

WORKER = """
import json, os, sys
import torch
import polymodal
from polymodal.config import apply_overrides
from polymodal.data import load_digits
from polymodal.train import TrainConfig, train

torch.set_num_threads(1)
overrides, run, dest = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
digits = load_digits()
spec = polymodal.registry.get("model", "vit")
torch.manual_seed(0)
model = spec.model_class(apply_overrides(spec.model_class.config_for_data(spec.config, digits), overrides))
model = train(model, digits, TrainConfig(**run), progress=False)
torch.save(model.state_dict(), f"{dest}.rank{os.environ['RANK']}.pt")
"""


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def tiny_vit(digits):
    spec = polymodal.registry.get("model", "vit")
    torch.manual_seed(0)
    return spec.model_class(apply_overrides(spec.model_class.config_for_data(spec.config, digits), TINY))


def one_process(digits, **run):
    return train(tiny_vit(digits), digits, TrainConfig(**(RUN | run)), progress=False).state_dict()


def env(tmp_path: Path) -> dict[str, str]:
    """The environment of a spawned run: one thread, a private cache, a 60 s collective timeout."""
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return clean | {
        "OMP_NUM_THREADS": "1",
        "POLYMODAL_THREADS": "1",
        "POLYMODAL_DIST_TIMEOUT_S": "60",
        "POLYMODAL_CACHE": str(tmp_path / "cache"),
    }


def torchrun(tmp_path: Path, *args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args]
    return subprocess.run(command, env=env(tmp_path), capture_output=True, text=True, timeout=TIMEOUT)


def worker(tmp_path: Path, run: dict) -> list[str]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    return [str(script), json.dumps(TINY), json.dumps(RUN | run), str(tmp_path / "weights")]


def assert_close(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= atol, f"largest difference {worst:.3g} > {atol}"


# -- the global batch ---------------------------------------------------------------------------------


def test_accumulated_micro_batches_reach_the_weights_of_one_batch(digits):
    assert_close(one_process(digits, accumulate=2), one_process(digits))


def test_a_batch_that_does_not_divide_is_a_clear_error(digits):
    two = DistributedContext(rank=0, world_size=2)  # checked before any collective: no process group needed
    with pytest.raises(ValueError, match=r"batch_size=15 .*world size 2 × accumulate=1"):
        train(tiny_vit(digits), digits, TrainConfig(steps=1, batch_size=15), progress=False, ctx=two)
    with pytest.raises(ValueError, match=r"batch_size=10 .*world size 1 × accumulate=4"):
        train(tiny_vit(digits), digits, TrainConfig(steps=1, batch_size=10, accumulate=4), progress=False)


def test_one_process_is_a_world_of_one_and_wraps_only_the_loss(digits, monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ctx = init_from_env("cpu")
    assert (ctx.rank, ctx.world_size, ctx.backend, ctx.is_main) == (0, 1, None, True)
    model = tiny_vit(digits)
    wrapped = wrap(model, TrainConfig(strategy="fsdp"), ctx)
    assert type(wrapped).__name__ == "LossModule" and wrapped.model is model
    batch = digits.train.batch(torch.arange(4))
    torch.manual_seed(1)
    loss, _ = wrapped(batch)
    torch.manual_seed(1)
    assert torch.equal(loss, model.loss(batch)[0])


# -- two processes == one process -------------------------------------------------------------------


def test_leaving_the_group_meets_the_other_ranks_first_unless_the_run_failed(digits, monkeypatch):
    import polymodal.train.distributed as d

    calls: list[str] = []
    monkeypatch.setattr(d.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(d.dist, "barrier", lambda *a, **k: calls.append("barrier"))
    monkeypatch.setattr(d.dist, "destroy_process_group", lambda *a, **k: calls.append("destroy"))
    owned = DistributedContext(rank=0, world_size=2, backend="gloo", owns_group=True)
    d.shutdown(owned)
    assert calls == ["barrier", "destroy"]  # a peer still in its last collective keeps its group
    calls.clear()
    d.shutdown(owned, wait=False)
    assert calls == ["destroy"]
    calls.clear()
    d.shutdown(DistributedContext(rank=0, world_size=2, backend="gloo"))  # the caller's own group
    assert calls == []
    import polymodal.train.trainer as trainer

    monkeypatch.setattr(d, "init_from_env", lambda device: owned)
    monkeypatch.setattr(trainer, "_train", lambda *a: (_ for _ in ()).throw(RuntimeError("rank failed")))
    with pytest.raises(RuntimeError, match="rank failed"):
        train(tiny_vit(digits), digits, TrainConfig(**RUN), progress=False)
    assert calls == ["destroy"]  # a failed rank does not wait at a barrier its peers may never reach


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_reach_the_weights_of_one(digits, tmp_path, strategy):
    done = torchrun(tmp_path, *worker(tmp_path, {"strategy": strategy}))
    assert done.returncode == 0, done.stderr[-3000:]
    expected = one_process(digits)
    for rank in (0, 1):  # every rank returns the whole trained model, a plain module
        assert_close(torch.load(tmp_path / f"weights.rank{rank}.pt"), expected)


SCALAR_WORKER = """
import os, sys, types
import torch
from torch import nn
from polymodal.data.base import Split
from polymodal.train import TrainConfig, train


class Scaled(nn.Module):  # a 0-dim parameter, which fully_shard cannot shard, beside a sharded matrix
    def __init__(self):
        super().__init__()
        self.lin, self.scale = nn.Linear(6, 4), nn.Parameter(torch.tensor(1.5))

    def loss(self, batch):
        return (self.lin(batch["x"]) * self.scale - batch["y"]).pow(2).mean(), {}


def run(strategy="auto"):
    g = torch.Generator().manual_seed(0)
    data = types.SimpleNamespace(name="toy", train=Split({"x": torch.randn(64, 6, generator=g), "y": torch.randn(64, 4, generator=g)}))
    torch.manual_seed(0)
    cfg = TrainConfig(steps=4, batch_size=16, warmup_steps=0, lr=0.05, grad_clip=0.05, strategy=strategy)
    return train(Scaled(), data, cfg, progress=False).state_dict()


if __name__ == "__main__":
    weights = run(sys.argv[1])
    import gc
    from torch.distributed.fsdp import FSDPModule

    # the sharded copy must be gone before the group was destroyed, not left to the interpreter's exit
    left = [o for o in gc.get_objects() if isinstance(o, FSDPModule)]
    assert not left, f"{len(left)} FSDP-sharded modules outlive the process group"
    torch.save(weights, f"{sys.argv[2]}.rank{os.environ['RANK']}.pt")
"""


def test_fsdp_keeps_a_0_dim_parameter_whole_and_clips_like_one_process(tmp_path):
    script = tmp_path / "scalar.py"
    script.write_text(SCALAR_WORKER)
    done = torchrun(tmp_path, str(script), "fsdp", str(tmp_path / "weights"))
    assert done.returncode == 0, done.stderr[-3000:]
    sys.path.insert(0, str(tmp_path))
    try:
        import scalar  # the same model and data in this process
    finally:
        sys.path.remove(str(tmp_path))
    expected = scalar.run()
    for rank in (0, 1):
        assert_close(torch.load(tmp_path / f"weights.rank{rank}.pt"), expected)


def test_two_machines_through_c10d_rendezvous_reach_the_weights_of_one(digits, tmp_path):
    script = worker(tmp_path, {})
    endpoint = f"127.0.0.1:{free_port()}"
    agents = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"]
            + ["--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "two-machines"]
            + ["--node-rank", str(node), *script],
            env=env(tmp_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in (0, 1)
    ]
    try:
        results = [agent.communicate(timeout=TIMEOUT) for agent in agents]
    finally:
        for agent in agents:
            agent.kill()
    for agent, (_, err) in zip(agents, results, strict=True):
        assert agent.returncode == 0, err[-3000:]
    expected = one_process(digits)
    for rank in (0, 1):
        assert_close(torch.load(tmp_path / f"weights.rank{rank}.pt"), expected)


# -- the command line ---------------------------------------------------------------------------------


def cli(*args: str) -> list[str]:
    sets = [x for s in TINY for x in ("--set", s)]
    return ["train", "vit", *sets, "--train-set", "batch_size=16", "--no-progress", *args]


def test_nproc_writes_one_model_folder_with_the_weights_of_one_process(tmp_path):
    out, single = tmp_path / "two", tmp_path / "one"
    command = [sys.executable, "-m", "polymodal.cli", *cli("--steps", "4", "--out", str(out), "--nproc", "2")]
    done = subprocess.run(command, env=env(tmp_path), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("saved model folder") == 1  # rank 0 alone reports
    assert done.stdout.count("accuracy:") == 1
    result = CliRunner().invoke(main, cli("--steps", "4", "--out", str(single)))
    assert result.exit_code == 0, result.output
    two, one = polymodal.api.load(out), polymodal.api.load(single)
    assert_close(two.state_dict(), one.state_dict())
    assert json.loads((out / "metrics.json").read_text())["steps"] == 4
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [4]  # one writer: rank 0's row, reduced over both ranks
    single_rows = [json.loads(line) for line in (single / "train_log.jsonl").read_text().splitlines()]
    assert abs(rows[0]["loss"] - single_rows[0]["loss"]) < 1e-5


def test_the_distributed_flags_set_the_trainer_fields(tmp_path):
    out = tmp_path / "run"
    flags = ["--strategy", "fsdp", "--cpu-offload", "--eval-every", "1"]
    result = CliRunner().invoke(main, cli("--steps", "2", "--out", str(out), *flags))
    assert result.exit_code == 0, result.output
    saved = checkpoint_meta(out)["train"]  # one process: a world of one, whatever the strategy
    assert (saved["strategy"], saved["cpu_offload"], saved["eval_every"], saved["compile"]) == ("fsdp", True, 1, False)


def _worker_pids(parent: int) -> dict[int, int]:
    """rank → pid of the processes whose parent is ``parent`` (the launcher), from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        ranks = [v[5:] for v in environ if v.startswith(b"RANK=")]
        if ppid == parent and ranks:
            found[int(ranks[0])] = int(entry.name)
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").is_file(), reason="finds the worker processes through /proc")
def test_a_killed_rank_ends_the_run_naming_it_and_the_checkpoint_still_resumes(tmp_path):
    out = tmp_path / "run"
    args = cli("--steps", "400", "--out", str(out), "--train-set", "checkpoint_every=2", "--nproc", "2")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "polymodal.cli", *args],
        env=env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        while checkpoint_meta(out) is None or not _worker_pids(launcher.pid).get(1):
            assert launcher.poll() is None and time.monotonic() < deadline, "no checkpoint was written"
            time.sleep(0.05)
        os.kill(_worker_pids(launcher.pid)[1], signal.SIGKILL)
        _, err = launcher.communicate(timeout=TIMEOUT)
    finally:
        launcher.kill()
    assert launcher.returncode == 1
    error = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "rank 1 (killed by SIGKILL)" in error[0], err[-3000:]
    step = checkpoint_meta(out)["step"]  # the checkpoint is whole, and one process continues it
    result = CliRunner().invoke(main, cli("--steps", str(step + 2), "--out", str(out), "--resume"))
    assert result.exit_code == 0, result.output
    assert checkpoint_meta(out)["step"] == step + 2


# -- streamed data ------------------------------------------------------------------------------------


def test_a_streamed_split_trains_like_the_in_memory_one_in_micro_batches(tmp_path):
    import numpy as np
    from PIL import Image

    from polymodal.data import load_folder

    (tmp_path / "img").mkdir()
    rng, rows = np.random.default_rng(0), []
    for i in range(41):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
        rows.append(
            json.dumps(
                {"path": f"img/{i}.png", "caption": f"image {i}", "label": f"c{i % 3}"}
                | ({"split": "test"} if i == 0 else {})
            )
        )
    (tmp_path / "captions.jsonl").write_text("\n".join(rows) + "\n")
    eager, lazy = load_folder(tmp_path), load_folder(tmp_path, lazy=True)
    assert hasattr(lazy.train, "loader") and not hasattr(eager.train, "loader")
    # the same layout on both paths: a channels-last stack picks other convolution kernels (other rounding)
    assert eager.train["image"].is_contiguous()
    spec = polymodal.registry.get("model", "vit")
    weights = []
    for data in (eager, lazy):
        torch.manual_seed(0)
        model = spec.model_class(apply_overrides(spec.model_class.config_for_data(spec.config, data), TINY))
        run = TrainConfig(steps=3, batch_size=8, accumulate=2, warmup_steps=0)
        weights.append(train(model, data, run, progress=False).state_dict())
    assert_close(weights[1], weights[0], atol=0.0)

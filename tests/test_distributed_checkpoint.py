"""Distributed checkpoints (polymodal.train.checkpoint): saved by 2 gloo processes under DDP or FSDP2 and
resumed by 1 (or saved by 1 and resumed by 2 under FSDP), a run reaches the weights of an uninterrupted
one-process run; loading unpickles nothing; a kill between the shard writes and the swap leaves the
previous checkpoint whole; checkpoints that do not fit fail naming the file.

The runs here drive the checkpoint functions directly with a small MLP, AdamW and an EMA, wrapped with
DDP or ``fully_shard`` by hand, so they test the checkpoint module alone. Each spawned group has a 60 s
process-group timeout and the test a join deadline: nothing hangs.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import time
from datetime import timedelta
from pathlib import Path

import attrs
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch import nn

import polymodal
from polymodal.config import apply_overrides
from polymodal.data import load_digits
from polymodal.io import LoadError
from polymodal.io.folders import save_state
from polymodal.models.recipe import TrainConfig
from polymodal.testing.ranks import free_port
from polymodal.train import checkpoint as ck
from polymodal.train import train
from polymodal.train.ema import EMAWeights

CFG = TrainConfig(steps=6, batch_size=8, lr=0.05, warmup_steps=0, checkpoint_every=0)
X = torch.randn(32, 5, generator=torch.Generator().manual_seed(1))  # (N, 5)
Y = torch.randn(32, 3, generator=torch.Generator().manual_seed(2))  # (N, 3)


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _run(job: dict, rank: int = 0, world: int = 1) -> None:
    """Train from scratch (or from ``out``'s checkpoint) to step ``until`` on ``world`` ranks as
    ``job['mode']`` ('single', 'ddp' or 'fsdp'); checkpoint at the end (or every ``save_every`` steps),
    and after a resumed run rank 0 writes the whole weights and EMA to ``OUT/result.safetensors``."""
    out, mode = Path(job["out"]), job["mode"]
    torch.set_num_threads(1)
    model = _net(job.get("init", 0))
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in (model[0], model[2]):
            fully_shard(layer)
        fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=CFG.lr, weight_decay=0.01)
    ema = EMAWeights(model, 0.9, warmup="none")
    step = 0
    if job.get("resume"):
        meta = ck.checkpoint_meta(out)
        step = ck.check_resume(meta, CFG, model, out / ck.CHECKPOINT)
        ck.load_checkpoint(out, model, opt, meta, ema)
    forward = nn.parallel.DistributedDataParallel(model) if mode == "ddp" else model
    local = CFG.batch_size // world
    while step < job["until"]:
        rows = torch.arange(step * CFG.batch_size, (step + 1) * CFG.batch_size) % len(X)
        mine = rows[rank * local : (rank + 1) * local]  # this rank's part of the global batch
        loss = nn.functional.mse_loss(forward(X[mine]), Y[mine])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(model)
        step += 1
        if job.get("save_every") and step % job["save_every"] == 0:
            if job.get("kill_before_swap") and step > job["save_every"] and rank == 0:

                def killed(*args, **kwargs):  # the shards are written; the process dies before the swap
                    os._exit(3)

                ck.save_state = killed
            ck.save_checkpoint(out, model, opt, step, CFG, ema=ema)
    if not job.get("save_every"):
        ck.save_checkpoint(out, model, opt, step, CFG, ema=ema)
    weights = {f"model.{k}": _full(v) for k, v in model.state_dict().items()}
    shadow = {f"ema.{k}": _full(v) for k, v in ema.state_dict().items()}
    if rank == 0 and job.get("resume"):
        save_state(out / "result.safetensors", weights | shadow, {"step": str(step)})


TINY_VIT = [
    "encoder.block.dim=32",
    "encoder.depth=2",
    "encoder.block.heads=2",
    "encoder.block.mlp_ratio=2.0",
    "encoder.block.drop_path=0.0",  # stochastic layers and augmentation off: runs must agree exactly
    "augment_shift=0",
]
VIT_RUN = {"steps": 4, "batch_size": 16, "warmup_steps": 1, "ema_decay": 0.9, "checkpoint_every": 0}


def _tiny_vit(digits, seed: int = 0):
    spec = polymodal.registry.get("model", "vit")
    torch.manual_seed(seed)
    return spec.model_class(apply_overrides(spec.model_class.config_for_data(spec.config, digits), TINY_VIT))


def _train_vit(job: dict, rank: int, world: int) -> None:
    """The trainer itself on this process group: a tiny ViT, stopped after ``job['stop_after']`` steps."""
    from polymodal.train.distributed import DistributedContext

    torch.set_num_threads(1)
    ctx = DistributedContext(rank=rank, local_rank=rank, world_size=world, device=torch.device("cpu"), backend="gloo")
    cfg = TrainConfig(**VIT_RUN, strategy=job["trainer"])
    train(_tiny_vit(load_digits()), load_digits(), cfg, out=job["out"], progress=False, stop_after=2, ctx=ctx)


def _worker(rank: int, world: int, port: int, jobs: list[dict]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        for job in jobs:
            if "copy" in job:  # rank 0 copies a checkpoint for a later job (or for the tests)
                if rank == 0:
                    shutil.copytree(Path(job["copy"]) / ck.CHECKPOINT, Path(job["to"]) / ck.CHECKPOINT)
            elif "trainer" in job:
                _train_vit(job, rank, world)
            else:
                _run(job, rank, world)
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn(jobs: list[dict], world: int = 2, deadline: float = 120.0) -> None:
    """Run ``jobs`` in turn on ``world`` gloo processes (one group: the start-up is paid once); raises if a
    process fails, or if they have not all ended by ``deadline`` s."""
    context = mp.start_processes(
        _worker, args=(world, free_port(), jobs), nprocs=world, join=False, start_method="spawn"
    )
    end = time.monotonic() + deadline
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > end:
                raise TimeoutError(f"the {world} processes did not end within {deadline} s")
    finally:
        for p in context.processes:
            if p.is_alive():
                p.kill()


def _run_single(job: dict) -> None:
    prior = torch.get_num_threads()
    try:
        _run(job)
    finally:
        torch.set_num_threads(prior)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted one-process run: 6 steps, its weights and EMA."""
    tmp = tmp_path_factory.mktemp("straight")
    _run_single({"out": str(tmp), "mode": "single", "until": 6, "resume": False})
    model, ema = (
        load_file(str(tmp / ck.CHECKPOINT / "model.safetensors")),
        load_file(str(tmp / ck.CHECKPOINT / "ema.safetensors")),
    )
    return {f"model.{k}": v for k, v in model.items()} | {f"ema.{k}": v for k, v in ema.items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One group of 2 processes (spawned once for the module) runs: 3 steps under DDP (``ddp``) and under
    FSDP (``fsdp``, whose checkpoint is also copied to ``fsdp-ddp``), each checkpointed; then resumes to
    step 6 the checkpoint 1 process saved after 3 steps (``single-fsdp``) under FSDP, and ``fsdp-ddp``
    under DDP; last, the trainer trains a tiny ViT for 2 of 4 steps under DDP (``vit``). Returns the run folders by name (resumed runs hold ``result.safetensors``)."""
    tmp = tmp_path_factory.mktemp("runs")
    run = {name: tmp / name for name in ("ddp", "fsdp", "fsdp-ddp", "single-fsdp", "vit")}
    _run_single({"out": str(run["single-fsdp"]), "mode": "single", "until": 3})
    resumed = {"until": 6, "resume": True, "init": 5}
    _spawn(
        [
            {"out": str(run["ddp"]), "mode": "ddp", "until": 3},
            {"out": str(run["fsdp"]), "mode": "fsdp", "until": 3},
            {"copy": str(run["fsdp"]), "to": str(run["fsdp-ddp"])},
            {"out": str(run["single-fsdp"]), "mode": "fsdp", **resumed},
            {"out": str(run["fsdp-ddp"]), "mode": "ddp", **resumed},
            {"out": str(run["vit"]), "trainer": "ddp"},
        ]
    )
    return run


@pytest.fixture
def ddp_checkpoint(runs):
    return runs["ddp"]


def _assert_close(result: dict, straight: dict) -> None:
    assert result.keys() == straight.keys()
    for k, v in straight.items():
        torch.testing.assert_close(result[k], v, atol=1e-5, rtol=0, msg=k)


def test_ddp_checkpoint_is_sharded_safetensors_and_json(ddp_checkpoint):
    folder = ddp_checkpoint / ck.CHECKPOINT
    meta = json.loads((folder / "trainer.json").read_text())
    assert (meta["format"], meta["world_size"], meta["strategy"], meta["step"]) == (ck.SHARDED, 2, "ddp", 3)
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert files == [
        "rng.safetensors",
        "state/shard-00001-model-00001-of-00001.safetensors",
        "state/shard-00002-model-00001-of-00001.safetensors",
        "trainer.json",
    ]
    keys = set(load_file(str(folder / files[1]))) | set(load_file(str(folder / files[2])))
    assert {"model.0.weight", "optim.2.bias.exp_avg_sq", "optim.0.weight.step", "ema.2.weight"} <= keys
    assert not list(ddp_checkpoint.glob(".checkpoint.*"))  # the temporary folder is gone


def test_saved_by_2_ddp_processes_resumes_in_1_to_the_uninterrupted_weights(ddp_checkpoint, straight, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(ddp_checkpoint / ck.CHECKPOINT, out / ck.CHECKPOINT)
    _run_single({"out": str(out), "mode": "single", "until": 6, "resume": True, "init": 5})
    assert "saved by 2 process(es) (ddp); resuming on 1 (single)" in capsys.readouterr().err
    _assert_close(load_file(str(out / "result.safetensors")), straight)
    assert (out / ck.CHECKPOINT / "model.safetensors").is_file()  # one process writes the one-file layout


@pytest.mark.parametrize(("saver", "loader"), [("single", "fsdp"), ("fsdp", "ddp"), ("fsdp", "single")])
def test_resume_at_another_world_size_and_strategy_reaches_the_uninterrupted_weights(
    saver, loader, runs, straight, tmp_path
):
    out = runs[f"{saver}-{loader}"] if loader != "single" else tmp_path / "run"
    if loader == "single":
        shutil.copytree(runs[saver] / ck.CHECKPOINT, out / ck.CHECKPOINT)
        _run_single({"out": str(out), "mode": "single", "until": 6, "resume": True, "init": 5})
    _assert_close(load_file(str(out / "result.safetensors")), straight)
    meta = json.loads((runs["fsdp"] / ck.CHECKPOINT / "trainer.json").read_text())
    assert (meta["format"], meta["world_size"], meta["strategy"]) == (ck.SHARDED, 2, "fsdp")


def test_loading_unpickles_nothing(ddp_checkpoint, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint load unpickled something")

    class Refused(pickle.Unpickler):
        def __init__(self, *args, **kwargs):
            refuse()

    for name in ("load", "loads"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(pickle, "Unpickler", Refused)
    monkeypatch.setattr(torch, "load", refuse)
    model = _net(7)
    opt = torch.optim.AdamW(model.parameters(), lr=CFG.lr, weight_decay=0.01)
    ema = EMAWeights(model, 0.9, warmup="none")
    meta = ck.checkpoint_meta(ddp_checkpoint)
    ck.load_checkpoint(ddp_checkpoint, model, opt, meta, ema)
    saved = load_file(str(next((ddp_checkpoint / ck.CHECKPOINT / ck.SHARDS).glob("shard-00001-*"))))
    assert any(torch.equal(model.state_dict()[k[6:]], v) for k, v in saved.items() if k.startswith("model."))
    assert ema.updates == 3 and opt.state[model[0].weight]["step"].item() == 3


def test_a_kill_between_the_shard_writes_and_the_swap_leaves_the_previous_checkpoint(straight, tmp_path):
    out = tmp_path / "run"
    job = {"out": str(out), "mode": "fsdp", "until": 4, "save_every": 2, "kill_before_swap": True}
    with pytest.raises((mp.ProcessExitedException, mp.ProcessRaisedException)):
        _spawn([job])  # rank 0 dies after the step-4 shards are written, before the swap
    (left,) = out.glob(".checkpoint.*.tmp")  # the step-4 shards, never swapped in
    assert len(list((left / ck.SHARDS).glob("shard-*.safetensors"))) == 2 and not (left / "trainer.json").exists()
    assert ck.checkpoint_meta(out)["step"] == 2  # the step-2 checkpoint, whole
    _run_single({"out": str(out), "mode": "single", "until": 6, "resume": True, "init": 5})
    _assert_close(load_file(str(out / "result.safetensors")), straight)


def test_a_checkpoint_that_does_not_fit_fails_naming_the_shards(ddp_checkpoint):
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(LoadError, match=r"(?s)checkpoint/state does not match.*0\.weight \(7, 5\) vs model \(8, 5\)"):
        ck.load_checkpoint(ddp_checkpoint, model, opt, ck.checkpoint_meta(ddp_checkpoint))


def test_a_truncated_shard_is_a_load_error_naming_the_folder(ddp_checkpoint, tmp_path):
    shutil.copytree(ddp_checkpoint / ck.CHECKPOINT, tmp_path / ck.CHECKPOINT)
    shard = next((tmp_path / ck.CHECKPOINT / ck.SHARDS).glob("shard-00002-*"))
    shard.write_bytes(shard.read_bytes()[:-64])
    model = _net(0)
    with pytest.raises(LoadError, match=r"checkpoint/state .*(truncated|not readable)"):
        ck.load_checkpoint(tmp_path, model, torch.optim.AdamW(model.parameters()), ck.checkpoint_meta(tmp_path))


def test_tied_and_strided_tensors_are_copied_for_safetensors(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter

    a = torch.randn(3, 4)
    tensors = {"t": a.t(), "a": a, "tied": a, "column": torch.randn(2, 3)[:, 1], "step": torch.tensor(3.0)}
    with pytest.warns(UserWarning, match="single process"):
        dcp.save(ck._unshared(tensors), storage_writer=HuggingFaceStorageWriter(str(tmp_path), save_distributed=True))
    back = {k: torch.zeros_like(v) for k, v in tensors.items()}
    with pytest.warns(UserWarning, match="single process"):
        dcp.load(back, storage_reader=HuggingFaceStorageReader(str(tmp_path)))
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


def test_strategy_world_and_loop_settings_are_free_on_resume(ddp_checkpoint):
    meta = ck.checkpoint_meta(ddp_checkpoint)
    changed = {"strategy": "fsdp", "accumulate": 2, "compile": True, "workers": 2, "eval_every": 5}
    assert ck.check_resume(meta, attrs.evolve(CFG, **changed), _net(0), "ck") == 3
    with pytest.raises(ck.TrainingError, match=r"train\.lr=0\.05.*train\.lr=0\.1"):
        ck.check_resume(meta, attrs.evolve(CFG, lr=0.1), _net(0), "ck")


def test_the_trainer_saving_at_2_ddp_processes_resumes_in_1_to_the_weights_of_an_uninterrupted_run(runs, tmp_path):
    digits = load_digits()
    cfg = TrainConfig(**VIT_RUN)
    straight = train(_tiny_vit(digits), digits, cfg, progress=False).state_dict()
    assert ck.checkpoint_meta(runs["vit"])["step"] == 2
    shutil.copytree(runs["vit"] / ck.CHECKPOINT, tmp_path / ck.CHECKPOINT)
    resumed = train(_tiny_vit(digits, seed=3), digits, cfg, out=tmp_path, progress=False, resume=True).state_dict()
    assert resumed.keys() == straight.keys()
    for k, v in straight.items():  # with an EMA: the returned model holds the average, also resumed
        torch.testing.assert_close(resumed[k], v, atol=1e-5, rtol=0, msg=k)

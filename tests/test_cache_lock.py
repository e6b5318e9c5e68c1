"""Two runs needing the same missing cache entry (a default part, a judge) make it once: the second waits
on the entry's lock and then reuses what the first wrote (``polymodal.io.cache.entry_lock``)."""

from __future__ import annotations

import threading
import time

import torch

import polymodal.api as api
import polymodal.eval.judge as judge_module
from polymodal.api import spec
from polymodal.data import load_dataset
from polymodal.io.cache import cache_entries, entry_lock
from polymodal.models.parts import auto_folder, part_fields


def test_a_run_waits_for_a_part_being_trained_and_reuses_it(tmp_path, monkeypatch, capsys):
    """Another process holds the part's lock and finishes the part meanwhile: no second training."""
    monkeypatch.setenv("POLYMODAL_CACHE", str(tmp_path))
    config = spec("dalle").config
    folder = auto_folder(part_fields(config)["tokenizer"])
    trainings: list[str] = []
    monkeypatch.setattr(api, "train_model", lambda variant, **_: trainings.append(variant))
    monkeypatch.setattr(api, "load_parts", lambda config: {})
    held = threading.Event()

    def first_run():
        with entry_lock(folder):
            held.set()
            time.sleep(0.5)
            folder.mkdir(parents=True)
            (folder / "config.json").write_text("{}")

    other = threading.Thread(target=first_run)
    other.start()
    held.wait()
    api.prepare_parts(config, progress=False)
    other.join()
    assert trainings == []
    err = capsys.readouterr().err
    assert "waiting for another process that is making" in err and "using the cached default part" in err


def test_two_runs_needing_the_same_judge_train_it_once(tmp_path, monkeypatch):
    """Both ask for the missing judge at once; one trains it, the other reads its files."""
    monkeypatch.setenv("POLYMODAL_CACHE", str(tmp_path))
    monkeypatch.setattr(judge_module, "_MEMORY", {})
    dataset = load_dataset("digits")
    trainings: list[str] = []

    def tiny_train(data, *args, **kwargs):
        trainings.append(data.name)
        time.sleep(0.3)  # long enough for the other thread to be asking meanwhile
        torch.manual_seed(0)
        judge = judge_module.Judge(1, 8, {"label": 10})
        judge.test_accuracy = {"label": 0.5}
        return judge

    monkeypatch.setattr(judge_module, "_train", tiny_train)
    judges: list = []

    def run():
        judges.append(judge_module.get_judge(dataset))
        judge_module._MEMORY.clear()  # the other run is another process: it shares files, not memory

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert trainings == ["digits"]
    assert len(judges) == 2 and judges[0].test_accuracy == judges[1].test_accuracy == {"label": 0.5}
    assert [e.kind for e in cache_entries(tmp_path)] == ["judge"]  # the lock file is hidden, not an entry

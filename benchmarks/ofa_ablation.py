"""OFA's multitask ablation: the default multitask model beside single-task models trained for the same steps.

    python benchmarks/ofa_ablation.py --out benchmarks/results/ofa-ablation-cpu-intel-xeon.json --jobs 2
    python benchmarks/ofa_ablation.py --steps 300 --tasks caption,vqa --jobs 1    # a quick look

OFA's paper reports that training on all tasks at once helps each (its ablation tables). This runs the same
comparison on the embedded data: ``polymodal train ofa`` as it is (every task mixed in each batch), then for each
task a model whose mixture is that task alone (the other weights 0), with the same recipe and number of steps
(less the recipe's captioning-first stage: a single-task model trains its own task from the pre-stage on), so a
single-task model sees that task in every row where the multitask model sees it in a share of them. Each model
is scored on its own task by the family's evaluation (the same functions ``polymodal eval`` runs). No bar: the
table says what sharing does here. Each training runs in its own process (``--jobs`` at a time, one thread
each); ``--out`` gets the JSON, and a Markdown table is printed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

TASK_METRICS = {
    "caption": ("caption_colour_kind", "caption_position", "caption_accuracy"),
    "vqa": ("vqa_accuracy", "vqa_yes_no", "vqa_count"),
    "ground": ("ground_accuracy",),
    "region": ("region_accuracy",),
    "text_to_image": ("sample_colour_accuracy", "sample_kind_accuracy"),
    "infill": ("infill_colour_accuracy",),
    "classify": ("classify_accuracy",),
}
"""Each task's scores, as :func:`polymodal.plugins.ofa.evaluate.evaluate_ofa` names them."""

WORKER = r"""
import json, sys, torch
torch.set_num_threads(1)
import polymodal
from polymodal.plugins.ofa import OFA
from polymodal.plugins.ofa.config import TASKS
from polymodal.plugins.ofa.evaluate import evaluate_ofa
task, steps, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
overrides = {} if task == "multitask" else {f"{t}_weight": float(t == task) for t in TASKS}
if task != "multitask":  # its own task from the first mixture step: no captioning-first stage
    overrides["caption_first_steps"] = 0
if task != "multitask":  # a single-task model is scored on its own task only
    OFA.evaluate = lambda self, dataset, split="test": evaluate_ofa(self, dataset, split, tasks=(task,))
_, metrics = polymodal.train("ofa", steps=steps, seed=seed, progress=False, **overrides)
print("RESULT " + json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float))}))
"""


def run_one(task: str, steps: int, seed: int) -> dict:
    """Train and score one model in a fresh process; its metrics (or the error's last lines)."""
    start = time.time()
    proc = subprocess.run(
        [sys.executable, "-c", WORKER, task, str(steps), str(seed)], capture_output=True, text=True, check=False
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"task": task, "error": proc.stderr[-2000:], "seconds": time.time() - start}
    return {"task": task, "metrics": json.loads(lines[-1][7:]), "seconds": time.time() - start}


def table(rows: dict[str, dict]) -> str:
    """Markdown: per task, its scores in the multitask model and in the model trained on it alone."""
    multi = rows.get("multitask", {}).get("metrics", {})
    out = ["| task | score | multitask | single-task |", "|---|---|---|---|"]
    for task, names in TASK_METRICS.items():
        single = rows.get(task, {})
        for name in names:
            alone = single.get("metrics", {}).get(name)
            cell = f"{alone:.3f}" if alone is not None else ("error" if "error" in single else "–")
            mine = multi.get(name)
            out.append(f"| {task} | `{name}` | {'–' if mine is None else f'{mine:.3f}'} | {cell} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Run the ablation; 1 when any training failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="training steps of every model (default: the recipe's)")
    parser.add_argument("--tasks", default=",".join(TASK_METRICS), help="single-task models to train (comma-separated)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1, help="trainings at once (one thread each)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write (refused if it exists)")
    args = parser.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = sorted(set(tasks) - set(TASK_METRICS))
    if unknown:
        parser.error(f"--tasks: unknown {', '.join(unknown)}; expected some of {', '.join(TASK_METRICS)}")
    if args.out is not None and args.out.exists():
        parser.error(f"--out {args.out} exists; give a new file")
    if args.steps is None:
        from polymodal.plugins.ofa import VARIANTS

        args.steps = VARIANTS["ofa"].train.steps

    def one(task: str) -> dict:
        row = run_one(task, args.steps, args.seed)
        print(f"{task}: {'failed' if 'error' in row else 'done'} in {row['seconds']:.0f} s", flush=True)
        return row

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        done = list(pool.map(one, ["multitask", *tasks]))
    rows = {r["task"]: r for r in done}
    if args.out is not None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import torch

        from bench import machine
        from polymodal.io.folders import atomic_write

        report = {"machine": machine(torch.device("cpu")), "steps": args.steps, "seed": args.seed, "rows": rows}
        atomic_write(args.out, json.dumps(report, indent=1))
    print(table(rows))
    return int(any("error" in r for r in done))


if __name__ == "__main__":
    raise SystemExit(main())

"""What holds OFA's image tasks back in the task mixture: per-task gradients and short curricula after the pre-stage.

    python benchmarks/ofa_curriculum.py                                   # the README's table, ≈ 1 h on one thread
    python benchmarks/ofa_curriculum.py --pre 20 --steps 20 --limit 8 --variants mixture,caption-first   # a smoke run

One stem pre-stage (the recipe's ``stem_pretrain_steps``, on moved scenes) is trained once; each variant then
starts from it and trains ``--steps`` steps at a constant lr after 100 warm-up steps, batch 32, and is scored on
the image-reading tasks by the family's evaluation (the first ``--limit`` test scenes). Every 100 steps the
mixture variants log each task's gradient norm on the shared weights and its cosine with captioning's. Variants:

* ``mixture``: the recipe's seven-task mixture; ``equal-norm``: the same with every task's gradient scaled to
  one norm before they are added (weighted by the task's rows);
* ``image-tasks``, ``caption+vqa``, ``caption+classify``: the mixture of those tasks only;
* ``reading-first``: captions, VQA and region questions for half the steps, then the mixture;
* ``caption-first``: captioning alone for half the steps, then the mixture (the recipe's ``caption_first_steps``).

No bar. The README's "Captioning first" table was measured with this script's draft (the same variants, steps,
rate and batch; its own data order), on the machine it names.
"""

from __future__ import annotations

import argparse
import json
import time

import attrs
import torch

from polymodal.api import create
from polymodal.data import load_dataset
from polymodal.plugins.ofa import SHAPES
from polymodal.plugins.ofa.config import TASKS
from polymodal.plugins.ofa.evaluate import evaluate_ofa
from polymodal.plugins.ofa.objective import mixed_task_loss
from polymodal.plugins.ofa.tasks import TaskCollate
from polymodal.train import TrainConfig, lr_at

ONLY = {
    "image-tasks": ("caption", "vqa", "ground", "region"),
    "caption+vqa": ("caption", "vqa"),
    "caption+classify": ("caption", "classify"),
}
FIRST = {"reading-first": ("caption", "vqa", "region"), "caption-first": ("caption",)}
VARIANTS = ("mixture", "equal-norm", *ONLY, *FIRST)


def only(config, tasks):
    """``config`` with every task outside ``tasks`` weighted 0 (the others keep their weights)."""
    return attrs.evolve(config, **{f"{t}_weight": getattr(config, f"{t}_weight") * (t in tasks) for t in TASKS})


def task_gradients(model, parts, shared):
    """Per task part: (its loss's gradient on ``shared`` flattened, its rows)."""
    out = {}
    for part in parts:
        loss, _ = mixed_task_loss(model, [part])
        grads = torch.autograd.grad(loss, shared, allow_unused=True)
        flat = [(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, shared, strict=True)]
        out[part["task"]] = (torch.cat(flat), len(part["instruction"]))
    return out


def fresh_model(pre_steps):
    """The recipe's model with ``pre_steps`` pre-stage steps and no captioning-first stage (the variants set theirs)."""
    torch.manual_seed(0)
    return create("ofa", "shapes", stem_pretrain_steps=pre_steps, caption_first_steps=0)


def set_gradients(params, vector):
    """Write the flat ``vector`` into the ``.grad`` of ``params``, in order."""
    at = 0
    for p in params:
        p.grad = vector[at : at + p.numel()].view_as(p).clone()
        at += p.numel()


def train_steps(model, steps, lr, seed, collate_at, gradient_at=None):
    """``steps`` AdamW steps (100 warm-up steps to a constant ``lr``, clipping at 1) on batches of 32 training scenes
    drawn by ``seed``; ``collate_at(i)`` is step i's collate and global step; ``gradient_at(i, parts)`` writes step
    i's gradients itself and returns True, or returns False for the plain mixture loss's."""
    train = load_dataset("shapes").split("train")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    schedule, order = TrainConfig(steps=steps, lr=lr, warmup_steps=100, min_lr_ratio=1.0), torch.Generator()
    order.manual_seed(seed)
    for i in range(steps):
        model.train()
        for group in opt.param_groups:
            group["lr"] = lr_at(i, schedule)
        collate, step = collate_at(i)
        parts = collate(train.batch(torch.randint(len(train["caption"]), (32,), generator=order).tolist()), step)
        opt.zero_grad()
        if gradient_at is None or not gradient_at(i, parts["parts"]):
            model.loss(parts)[0].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()


def run_variant(name, args, pre_state, log):
    """Train one variant from the pre-stage's weights; its scores."""
    model = fresh_model(args.pre)
    model.load_state_dict(pre_state)
    pre, first_steps = model.config.stem_pretrain_steps, args.steps // 2
    mixture = TaskCollate(only(model.config, ONLY[name]) if name in ONLY else model.config, model.vocab, model.texts())
    first = TaskCollate(only(model.config, FIRST[name]), model.vocab, model.texts()) if name in FIRST else None
    shared = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("object_head")]

    def gradient_at(i, parts):
        """Every task's gradient apart (equal-norm steps, and every 100th step to log them); False otherwise."""
        if name != "equal-norm" and (i + 1) % 100:
            return False
        grads = task_gradients(model, parts, shared)
        total = sum(r for _, r in grads.values())
        unit = name == "equal-norm"
        set_gradients(shared, sum(g / (g.norm() + 1e-12 if unit else 1.0) * (r / total) for g, r in grads.values()))
        if (i + 1) % 100 == 0 and "caption" in grads:
            cap = grads["caption"][0]
            cosines = {t: float(g @ cap / (g.norm() * cap.norm() + 1e-12)) for t, (g, _) in grads.items()}
            log(
                {
                    "variant": name,
                    "step": i + 1,
                    "norm": {t: round(float(g.norm()), 3) for t, (g, _) in grads.items()},
                    "cos_caption": {t: round(c, 3) for t, c in cosines.items() if t != "caption"},
                }
            )
        return True

    def collate_at(i):
        return (first if first is not None and i < first_steps else mixture), pre + i

    train_steps(model, args.steps, args.lr, 1, collate_at, gradient_at)
    model.eval()
    model.config = attrs.evolve(model.config, eval_limit=args.limit)
    with torch.no_grad():
        return evaluate_ofa(model, load_dataset("shapes"), tasks=("caption", "vqa", "ground", "region"))


def main(argv: list[str] | None = None) -> None:
    """Train the pre-stage once, then every variant; print JSON lines and a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pre", type=int, default=SHAPES.config.stem_pretrain_steps, help="pre-stage steps")
    parser.add_argument("--steps", type=int, default=1000, help="steps of each variant after the pre-stage")
    parser.add_argument("--lr", type=float, default=SHAPES.train.lr)
    parser.add_argument("--limit", type=int, default=200, help="test scenes scored")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"some of {', '.join(VARIANTS)}")
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    if unknown := set(variants) - set(VARIANTS):
        parser.error(f"unknown variants {sorted(unknown)}; expected some of {', '.join(VARIANTS)}")
    torch.set_num_threads(1)

    def log(record):
        print(json.dumps(record), flush=True)

    model, start = fresh_model(args.pre), time.time()
    collate = TaskCollate(model.config, model.vocab, model.texts())
    train_steps(model, args.pre, args.lr, 0, lambda i: (collate, i))
    log({"pre_stage_steps": args.pre, "seconds": round(time.time() - start)})
    pre_state = model.state_dict()
    table = []
    for name in variants:
        start = time.time()
        scores = run_variant(name, args, pre_state, log)
        log({"variant": name, "seconds": round(time.time() - start), **{k: round(v, 3) for k, v in scores.items()}})
        table.append((name, scores))
    print("\n| variant | captions colour+kind (position) | VQA | grounding | region |\n|---|---|---|---|---|")
    for name, m in table:
        print(
            f"| {name} | {m['caption_colour_kind']:.2f} ({m['caption_position']:.2f}) | {m['vqa_accuracy']:.2f} "
            f"| {m['ground_accuracy']:.2f} | {m['region_accuracy']:.2f} |"
        )


if __name__ == "__main__":
    main()

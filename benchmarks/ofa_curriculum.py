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
* ``caption-first``: captioning alone for half the steps, then the mixture (the recipe's ``caption_first_steps``);
* any curriculum given as stages, ``TASK+TASK:STEPS/…`` (``all``: the mixture), e.g.
  ``caption:1000/caption+text_to_image:500/all:1500``, replacing ``--steps``.

``--save-pre FILE`` keeps the pre-stage's weights, ``--load-pre FILE`` starts from them instead of training it;
``--tasks all`` also scores text-to-image, infilling and the text task.

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
from polymodal.plugins.ofa.config import TASKS, parse_stage
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
READING = ("caption", "vqa", "ground", "region")
"""The tasks scored by default: those that read the image."""
MORE = ("classify_accuracy", "sample_colour_accuracy", "sample_kind_accuracy", "infill_colour_accuracy")
"""The scores ``--tasks all`` adds to the table."""


def parse_stages(spec):
    """``'caption:1000/caption+vqa:500/all:1500'`` → ``[(("caption",), 1000), (("caption", "vqa"), 500), (None,
    1500)]`` (None: every task; the others as the recipe's ``first_stages``, :func:`parse_stage`), or a ValueError."""
    stages = []
    for part in spec.split("/"):
        if part.startswith("all:"):  # the mixture: its steps checked as any stage's
            stages.append((None, parse_stage(f"{TASKS[0]}:{part[4:]}")[1]))
        else:
            stages.append(parse_stage(part))
    return stages


def variant_stages(name, steps):
    """The stages of a named variant (or of a stage spec), as :func:`parse_stages` gives them."""
    if name in ("mixture", "equal-norm"):
        return [(None, steps)]
    if name in ONLY:
        return [(ONLY[name], steps)]
    if name in FIRST:
        return [(FIRST[name], steps // 2), (None, steps - steps // 2)]
    return parse_stages(name)


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
    pre, stages = model.config.stem_pretrain_steps, variant_stages(name, args.steps)
    collates, ends = [], []
    for tasks, steps in stages:
        config = model.config if tasks is None else only(model.config, tasks)
        collates.append(TaskCollate(config, model.vocab, model.texts()))
        ends.append(steps + (ends[-1] if ends else 0))
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
        return collates[next(k for k, end in enumerate(ends) if i < end)], pre + i

    train_steps(model, ends[-1], args.lr, 1, collate_at, gradient_at)
    model.eval()
    model.config = attrs.evolve(model.config, eval_limit=args.limit)
    with torch.no_grad():
        return evaluate_ofa(model, load_dataset("shapes"), tasks=TASKS if args.tasks == "all" else READING)


def main(argv: list[str] | None = None) -> None:
    """Train the pre-stage once, then every variant; print JSON lines and a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pre", type=int, default=SHAPES.config.stem_pretrain_steps, help="pre-stage steps")
    parser.add_argument("--steps", type=int, default=1000, help="steps of each variant after the pre-stage")
    parser.add_argument("--lr", type=float, default=SHAPES.train.lr)
    parser.add_argument("--limit", type=int, default=200, help="test scenes scored")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"some of {', '.join(VARIANTS)}, or stage specs (above)"
    )
    parser.add_argument("--tasks", choices=("reading", "all"), default="reading", help="the tasks scored")
    parser.add_argument("--save-pre", help="write the pre-stage's weights to this new file")
    parser.add_argument("--load-pre", help="start every variant from these pre-stage weights (a --save-pre file)")
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    for name in variants:
        if name not in VARIANTS and ":" not in name:
            parser.error(f"unknown variant {name!r}; expected one of {', '.join(VARIANTS)} or a stage spec")
        try:
            variant_stages(name, args.steps)
        except ValueError as exc:
            parser.error(str(exc))
    torch.set_num_threads(1)

    def log(record):
        print(json.dumps(record), flush=True)

    model, start = fresh_model(args.pre), time.time()
    if args.load_pre:
        pre_state = torch.load(args.load_pre, weights_only=True)  # a tensor file this script wrote
    else:
        collate = TaskCollate(model.config, model.vocab, model.texts())
        train_steps(model, args.pre, args.lr, 0, lambda i: (collate, i))
        log({"pre_stage_steps": args.pre, "seconds": round(time.time() - start)})
        pre_state = model.state_dict()
        if args.save_pre:
            with open(args.save_pre, "xb") as f:  # a new file: never another's
                torch.save(pre_state, f)
    table = []
    for name in variants:
        start = time.time()
        scores = run_variant(name, args, pre_state, log)
        log({"variant": name, "seconds": round(time.time() - start), **{k: round(v, 3) for k, v in scores.items()}})
        table.append((name, scores))
    print("\n| variant | captions colour+kind (position) | VQA (yes/no) | grounding | region | more |")
    print("|---|---|---|---|---|---|")
    for name, m in table:
        more = ", ".join(f"{k} {m[k]:.2f}" for k in MORE if k in m)
        print(
            f"| {name} | {m['caption_colour_kind']:.2f} ({m['caption_position']:.2f}) | {m['vqa_accuracy']:.2f} "
            f"({m['vqa_yes_no']:.2f}) | {m['ground_accuracy']:.2f} | {m['region_accuracy']:.2f} | {more} |"
        )


if __name__ == "__main__":
    main()

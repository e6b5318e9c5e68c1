"""Can OFA's encoder–decoder bind an attribute to a place? A toy of the region question, outside the recipe.

    python benchmarks/ofa_binding.py                   # the README's rows, ≈ 10 min on one thread
    python benchmarks/ofa_binding.py --steps 20 --variants equal   # a smoke run

Sixteen "patch" tokens (a 4×4 grid) hold two objects: each patch is a colour embedding (black but for the two
object patches) plus its position embedding. The query is the box of one object as four location tokens
(x0, y0, x1, y1 from a table of 33 bins, with a role embedding each), jittered as the shapes boxes are; the
decoder's first state answers the colour there. The encoder and decoder are OFA's (its ``block_config``: pre-LN,
NormFormer, the decoder's cross-attention and causal T5 bias), width 192, 3 + 3 blocks, AdamW at 5e-4, batch 32.
Half the answer's information is in the bag of colours (chance 0.5); the rest needs the place.

Variants: ``equal`` (colour and position embeddings both drawn at std 1), ``content-heavy`` (colour at std 1,
position at std 0.02: 50×, where the recipe's stem features are 20–35× ``image_pos``), ``one-object`` (``equal`` with half
the scenes holding one object, as the shapes split does), ``instruction`` (``equal`` with 15 learned tokens,
the same in every example, before the box: the region instruction's words).

No bar; the accuracy on 500 fresh scenes every ``--every`` steps.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.nn import StackConfig, TransformerStack
from polymodal.nn.embed import init_weights
from polymodal.plugins.ofa.config import OFAConfig
from polymodal.plugins.ofa.model import block_config

VARIANTS = ("equal", "content-heavy", "one-object", "instruction")
INSTRUCTION = 15
"""Tokens of the ``instruction`` variant's constant text before the box (the region instruction's length)."""
GRID, COLOURS, BINS, DIM = 4, 8, 33, 192


class Toy(nn.Module):
    """OFA's encoder and decoder over 16 patch tokens and a 4-token box query; the answer from the first state."""

    def __init__(self, content_std: float, position_std: float, instruction: int = 0) -> None:
        super().__init__()
        c = OFAConfig(dim=DIM, heads=6)
        self.encoder = TransformerStack(StackConfig(depth=3, block=block_config(c, False)))
        self.decoder = TransformerStack(StackConfig(depth=3, block=block_config(c, True)))
        init_weights(self.encoder)
        init_weights(self.decoder)
        self.colour = nn.Embedding(COLOURS, DIM)
        self.position = nn.Parameter(torch.randn(GRID * GRID, DIM) * position_std)
        self.bins = nn.Embedding(BINS, DIM)
        self.role = nn.Parameter(torch.randn(4, DIM) * 0.02)
        self.start = nn.Parameter(torch.randn(1, 1, DIM) * 0.02)
        self.instruction = nn.Parameter(torch.randn(1, instruction, DIM) * 0.02)  # (1, I, D), I may be 0
        nn.init.normal_(self.colour.weight, std=content_std)
        nn.init.normal_(self.bins.weight, std=0.02)
        self.norm, self.decoder_norm, self.head = nn.LayerNorm(DIM), nn.LayerNorm(DIM), nn.Linear(DIM, COLOURS)

    def forward(self, colours: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Patch colours (B, 16) and box bins (B, 4) → colour logits (B, COLOURS)."""
        patches = self.colour(colours) + self.position  # (B, 16, D)
        query = self.bins(boxes) + self.role  # (B, 4, D)
        query = torch.cat([self.instruction.expand(len(boxes), -1, -1), query], dim=1)  # (B, I + 4, D)
        states = self.encoder(self.norm(torch.cat([patches, query], dim=1)))  # (B, 16 + I + 4, D)
        start = self.decoder_norm(self.start.expand(len(colours), 1, DIM))  # (B, 1, D)
        return self.head(self.decoder(start, states, causal=True)[:, 0])  # (B, COLOURS)


def scenes(n: int, one_object_share: float, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """``n`` scenes: patch colours (n, 16), the asked object's box bins (n, 4) and its colour (n,)."""
    places = torch.stack([torch.randperm(GRID * GRID, generator=generator)[:2] for _ in range(n)])  # (n, 2)
    colours = torch.stack([torch.randperm(COLOURS - 1, generator=generator)[:2] + 1 for _ in range(n)])  # (n, 2)
    alone = torch.rand(n, generator=generator) < one_object_share  # (n,)
    grid = torch.zeros(n, GRID * GRID, dtype=torch.long).scatter(1, places, colours)  # (n, 16)
    grid[alone, places[alone, 1]] = 0
    asked = torch.where(alone, 0, torch.randint(0, 2, (n,), generator=generator))  # (n,)
    place = places.gather(1, asked[:, None])[:, 0]  # (n,)
    x0 = 8 * (place % GRID) + torch.randint(0, 3, (n,), generator=generator)
    y0 = 8 * (place // GRID) + torch.randint(0, 3, (n,), generator=generator)
    x1 = (x0 + torch.randint(5, 10, (n,), generator=generator)).clamp(max=BINS - 1)
    y1 = (y0 + torch.randint(5, 10, (n,), generator=generator)).clamp(max=BINS - 1)
    return grid, torch.stack([x0, y0, x1, y1], dim=1), colours.gather(1, asked[:, None])[:, 0]


def run(variant: str, steps: int, every: int, seed: int = 0) -> list[dict]:
    """Train one variant; its test accuracy every ``every`` steps (two-object scenes only)."""
    torch.manual_seed(seed)
    model = Toy(1.0, 0.02 if variant == "content-heavy" else 1.0, INSTRUCTION if variant == "instruction" else 0)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.01)
    data, held_out = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    test = scenes(500, 0.0, held_out)
    rows = []
    for step in range(1, steps + 1):
        grid, boxes, target = scenes(32, 0.5 if variant == "one-object" else 0.0, data)
        loss = F.cross_entropy(model(grid, boxes), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0 or step == steps:
            with torch.no_grad():
                accuracy = (model(*test[:2]).argmax(-1) == test[2]).float().mean().item()
            rows.append({"variant": variant, "step": step, "two_object_accuracy": round(accuracy, 3)})
    return rows


def main(argv: list[str] | None = None) -> None:
    """Every variant; JSON lines, then a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    args = parser.parse_args(argv)
    wanted = args.variants.split(",")
    if set(wanted) - set(VARIANTS):
        raise SystemExit(f"unknown variants {sorted(set(wanted) - set(VARIANTS))}; expected some of {VARIANTS}")
    table = {}
    for variant in wanted:
        for row in run(variant, args.steps, args.every):
            print(json.dumps(row), flush=True)
            table.setdefault(variant, []).append(row)
    steps = [r["step"] for r in next(iter(table.values()))]
    print("\n| variant | " + " | ".join(f"step {s}" for s in steps) + " |")
    print("|---|" + "---|" * len(steps))
    for variant, rows in table.items():
        print(f"| {variant} | " + " | ".join(f"{r['two_object_accuracy']:.2f}" for r in rows) + " |")


if __name__ == "__main__":
    main()

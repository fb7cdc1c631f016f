"""Attention recall of each scorer on synthetic units whose true attention is known, on the CPU.

    python -m bench.synthetic_recall [--seeds 20] --out FILE.json

Each case: 30 units of 4 to 16 Gaussian keys around a centre per kv head (2 kv heads, 2 query heads each, 4
question tokens, head dim 16), summarised as the engine summarises a cluster (mean, variance, count), and one past
key per kv head standing for the stream's sink and window. The rows' true attention is a softmax over the past
and every key; recall is the true mass of a choice over the mass of the best keys of the same budget (20% of the
keys), as ``recall_probe.RecallProbe`` measures it; ``ceiling`` takes the units of most true mass per token
while they fit.

Two settings:
- ``plain``: both heads alike, the past key random;
- ``loud sink head``: head 0's centres four times longer (its logits four times larger) and its past key aligned
  with its queries, so that it gives most of its attention to the past, as attention sinks do.

Random keys stand for nothing a real model does: this shows what each scorer's reduction over the query rows does
when the rows differ, not what it does on the 7B model's attention.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from mosaic_core.engine.scorers import scorer_by_name
from mosaic_core.engine.selection import fill_in_order

SCORERS = ("spread", "spread_per_token", "spread_share", "spread_share_per_token", "mean_key", "random")
SETTINGS = ("plain", "loud sink head")
DIM, KV_HEADS, GROUP, TOKENS, UNITS = 16, 2, 2, 4, 30
BUDGET_SHARE = 0.2


def case(seed: int, *, loud_sink_head: bool, scorers: tuple[str, ...] = SCORERS) -> dict[str, float]:
    """Recall of each scorer's choice and of the ceiling, in one synthetic case (module doc)."""
    gen = torch.Generator().manual_seed(seed)
    scale = DIM**-0.5
    query = torch.randn(KV_HEADS * GROUP, TOKENS, DIM, generator=gen)
    sizes = torch.randint(4, 17, (UNITS,), generator=gen).tolist()
    centres = torch.randn(UNITS, KV_HEADS, DIM, generator=gen)
    if loud_sink_head:
        centres[:, 0] *= 4.0
    keys = [centres[c][:, None] + 0.5 * torch.randn(KV_HEADS, n, DIM, generator=gen) for c, n in enumerate(sizes)]
    past = torch.randn(KV_HEADS, 1, DIM, generator=gen)
    if loud_sink_head:
        head0 = query[:GROUP].reshape(-1, DIM).mean(0)
        past[0, 0] = 40.0 * head0 / head0.norm()
    every_key = torch.cat([past, *keys], dim=1)  # [Hkv, 1 + N, D]
    rows = query.reshape(KV_HEADS, GROUP * TOKENS, DIM)
    mass = torch.softmax(scale * rows @ every_key.transpose(1, 2), dim=-1).sum(dim=(0, 1))[1:]
    unit_mass = torch.stack([part.sum() for part in mass.split(sizes)])
    budget = int(BUDGET_SHARE * sum(sizes))
    oracle = float(mass.topk(budget).values.sum())

    def recall_of(scores: torch.Tensor) -> float:
        chosen = fill_in_order(torch.argsort(scores, descending=True).tolist(), sizes, budget, min(sizes))
        return float(unit_mass[chosen].sum()) / oracle

    mean = torch.stack([k.mean(1) for k in keys])  # [C, Hkv, D]
    var = torch.stack([k.var(1, unbiased=False) for k in keys])
    log_count = torch.log(torch.tensor(sizes, dtype=torch.float32))
    past_lse = torch.logsumexp(scale * rows @ past.transpose(1, 2), dim=-1).reshape(KV_HEADS * GROUP, TOKENS)
    recall = {
        name: recall_of(
            scorer_by_name(name, seed=seed).scores(query, mean, var, log_count, scale=scale, past_lse=past_lse)
        )
        for name in scorers
    }
    recall["ceiling"] = recall_of(unit_mass / torch.tensor(sizes, dtype=torch.float32))
    recall["history_share"] = float(mass.sum()) / float(KV_HEADS * GROUP * TOKENS)
    return recall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.synthetic_recall", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    report = {"seeds": args.seeds, "budget_share": BUDGET_SHARE, "settings": {}}
    lines = [f"mean recall over {args.seeds} cases (min - max); budget {BUDGET_SHARE:.0%} of the keys"]
    lines.append(f"{'scorer':<24}" + "".join(f"{s:>28}" for s in SETTINGS))
    cells: dict[str, list[str]] = {}
    for setting in SETTINGS:
        cases = [case(seed, loud_sink_head=setting != "plain") for seed in range(args.seeds)]
        summary = {}
        for name in (*SCORERS, "ceiling", "history_share"):
            values = [c[name] for c in cases]
            summary[name] = {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}
            cells.setdefault(name, []).append(
                f"{summary[name]['mean']:.3f} ({summary[name]['min']:.3f}-{summary[name]['max']:.3f})"
            )
        report["settings"][setting] = summary
    lines += [f"{name:<24}" + "".join(f"{cell:>28}" for cell in row) for name, row in cells.items()]
    text = "\n".join(lines)
    print(text)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".txt").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What one choosing layer's scoring costs, per scorer, at the 7B shape and a 60-minute history.

    python -m bench.scorer_cost [--clusters 1428] [--question-tokens 32] [--past-tokens 4100] --out FILE.json

Random summaries of ``--clusters`` units and a random question (28 query heads, 4 kv heads, head dim 128, bf16
queries as the model gives them), on CUDA when there is one. Each scorer's ``scores`` is timed alone, and the share
scorers also with what they read of the stream's past: each query row's log-sum-exp over ``--past-tokens`` slots
of a page pool laid out as the engine's (one frame of 126 tokens a page), read in place as the retriever reads it
(``attend.past_logsumexp``).
Medians of 50 runs after 10 of warm-up; on CUDA each run is timed from before its first launch to after its last
kernel, with the host waiting for the device in between runs, so launches are counted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from mosaic_core.engine.attend import past_logsumexp
from mosaic_core.engine.scorers import scorer_by_name

SCORERS = ("spread", "spread_per_token", "spread_share", "spread_share_per_token", "mean_key")
Q_HEADS, KV_HEADS, HEAD_DIM, PAGE_TOKENS, POOL_LAYERS = 28, 4, 128, 126, 2


def timed_ms(run, device: torch.device, rounds: int = 50, warmup: int = 10) -> float:
    """Median ms of ``rounds`` runs after ``warmup``, the host waiting for ``device`` before and after each."""
    times = []
    for i in range(warmup + rounds):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scorer_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clusters", type=int, default=1428)
    parser.add_argument("--question-tokens", type=int, default=32)
    parser.add_argument("--past-tokens", type=int, default=4100)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(Q_HEADS, args.question_tokens, HEAD_DIM, generator=gen).to(device, torch.bfloat16)
    mean = torch.randn(args.clusters, KV_HEADS, HEAD_DIM, generator=gen).to(device)
    var = torch.rand(args.clusters, KV_HEADS, HEAD_DIM, generator=gen).to(device)
    log_count = torch.log(torch.randint(126, 4 * 126, (args.clusters,), generator=gen).float()).to(device)
    num_pages = -(-args.past_tokens // PAGE_TOKENS) * 4
    pool = torch.randn(num_pages, POOL_LAYERS, 2, KV_HEADS, PAGE_TOKENS, HEAD_DIM, generator=gen).to(
        device, torch.bfloat16
    )
    slots = np.random.default_rng(0).permutation(num_pages * PAGE_TOKENS)[: args.past_tokens]
    table = torch.as_tensor(slots, dtype=torch.int32).reshape(1, -1).to(device)
    k_pages, v_pages = pool[:, 1, 0], pool[:, 1, 1]
    scale = HEAD_DIM**-0.5

    def past() -> torch.Tensor:
        return past_logsumexp(query, k_pages, v_pages, table, scale)

    rows = {}
    for name in SCORERS:
        scorer = scorer_by_name(name)
        given = past() if scorer.needs_past else None
        row = {"scores_ms": timed_ms(lambda s=scorer, p=given: s.scores(query, mean, var, log_count, scale=scale,
                                                                            past_lse=p), device)}  # fmt: skip
        if scorer.needs_past:
            row["with_past_read_ms"] = timed_ms(
                lambda s=scorer: s.scores(query, mean, var, log_count, scale=scale, past_lse=past()), device
            )
        rows[name] = row
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "clusters": args.clusters,
        "question_tokens": args.question_tokens,
        "past_tokens": args.past_tokens,
        "scorers": rows,
    }
    lines = [f"{report['device']}: {args.clusters} clusters, {args.question_tokens} question tokens, "
             f"{args.past_tokens} past tokens; ms a choosing layer, median of 50"]  # fmt: skip
    for name, row in rows.items():
        extra = f", with the past read {row['with_past_read_ms']:.3f}" if "with_past_read_ms" in row else ""
        lines.append(f"  {name:<24} {row['scores_ms']:.3f}{extra}")
    print("\n".join(lines))
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

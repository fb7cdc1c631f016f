"""The share scorer's read of the past, in place against copied, on CUDA.

    python -m bench.lse_check [--out FILE.txt]

``kernels.attention.paged_slot_logsumexp`` (each query row's log-sum-exp over the keys of a slot table, read in
place from the page pool) against its torch reference, which copies the slots' keys first, at three shapes
including the 7B's (28 query heads, 4 kv heads, head dim 128, one frame of 126 tokens a page) over a 60-minute
past of 4,100 slots, bf16. Then the time of each at the 7B's shape with a 32-token question: medians of 50 runs
after 10 of warm-up, the host waiting for the device before and after each, so launches and host work count.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench.scorer_cost import timed_ms
from mosaic_core.kernels.attention import paged_slot_logsumexp
from mosaic_core.kernels.reference import grouped_rows, paged_slot_logsumexp_reference

SHAPES = [(28, 4, 126, 128, 32, 4100), (28, 4, 126, 128, 17, 300), (4, 2, 16, 64, 5, 9)]  # q, kv, page, d, t, keys
TOLERANCE = 2e-2


def _pool(num_kv_heads: int, page_tokens: int, head_dim: int, num_keys: int, gen: torch.Generator, device):
    pages = -(-num_keys // page_tokens) * 4
    pool = torch.randn(pages, 2, 2, num_kv_heads, page_tokens, head_dim, generator=gen).to(device, torch.bfloat16)
    slots = torch.randperm(pages * page_tokens, generator=gen)[:num_keys]
    return pool, slots


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lse_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device (the kernel tests cover the CPU, through Triton's interpreter)")
    device, gen, lines = torch.device("cuda"), torch.Generator().manual_seed(0), []
    for num_q_heads, num_kv_heads, page_tokens, head_dim, tokens, num_keys in SHAPES:
        pool, slots = _pool(num_kv_heads, page_tokens, head_dim, num_keys, gen, device)
        k_pages, v_pages = pool[:, 1, 0], pool[:, 1, 1]
        table = slots.to(torch.int32).reshape(1, -1).to(device)
        query = (torch.randn(num_q_heads, tokens, head_dim, generator=gen) * 2).to(device, torch.bfloat16)
        scale = head_dim**-0.5
        got = paged_slot_logsumexp(query, k_pages, v_pages, table, scale=scale)
        error = (got - paged_slot_logsumexp_reference(query, k_pages, table, scale=scale)).abs().max().item()
        verdict = "ok" if error < TOLERANCE else "FAILED"
        lines.append(
            f"q{num_q_heads} kv{num_kv_heads} page{page_tokens} d{head_dim} t{tokens} keys{num_keys}: "
            f"max abs error {error:.2e} ({verdict})"
        )

    num_q_heads, num_kv_heads, page_tokens, head_dim, tokens, num_keys = SHAPES[0]
    pool, slots = _pool(num_kv_heads, page_tokens, head_dim, num_keys, gen, device)
    k_pages, v_pages = pool[:, 1, 0], pool[:, 1, 1]
    table, index = slots.to(torch.int32).reshape(1, -1).to(device), slots.to(device)
    query = torch.randn(num_q_heads, tokens, head_dim, generator=gen).to(device, torch.bfloat16)
    scale = head_dim**-0.5

    def copied() -> torch.Tensor:  # as the share scorer did before 8c29932
        keys = pool[index // page_tokens, 1, 0, :, index % page_tokens].transpose(0, 1)
        logits = scale * torch.bmm(grouped_rows(query, num_kv_heads), keys.float().transpose(1, 2))
        return torch.logsumexp(logits, dim=2)

    in_place = timed_ms(lambda: paged_slot_logsumexp(query, k_pages, v_pages, table, scale=scale), device)
    lines.append(
        f"in place {in_place:.3f} ms; keys copied, bmm {timed_ms(copied, device):.3f} ms "
        f"({tokens} question tokens over {num_keys:,} past slots)"
    )
    print("\n".join(lines))
    if args.out is not None:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

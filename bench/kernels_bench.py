"""Micro-benchmark of the Mosaic Triton kernels against their torch references and SDPA.

On a GPU every case is timed with CUDA events through ``triton.testing.do_bench`` (median). With ``--quick``
and no GPU it runs tiny sizes in Triton's CPU interpreter and times with the wall clock: a smoke test of
this script, not a measurement. Every kernel's result is also checked against its reference (``max_err``).

    python bench/kernels_bench.py              # GPU, 7B-class shapes (28 q heads, 4 kv heads, head_dim 128)
    python bench/kernels_bench.py --quick      # tiny sizes; runs on CPU under TRITON_INTERPRET=1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch.nn.functional as F
import triton

from mosaic_core import kernels


@dataclass(slots=True)
class Row:
    section: str
    case: str
    impl: str
    event_ms: float  # do_bench median (CUDA events); wall clock on CPU
    wall_ms: float | None  # host wall clock around call + synchronize: what an eager caller waits
    graph_ms: float | None  # CUDA-graph replay: GPU time without launch overhead (None: not captured)
    bytes_moved: int = 0
    max_err: float | None = None


def _wall_ms(fn: Callable[[], object], cuda: bool, reps: int) -> float:
    samples = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def measure(
    section: str, case: str, impl: str, fn: Callable[[], object], cuda: bool, *, graph: bool = True,
    bytes_moved: int = 0, err: float | None = None,
) -> Row:  # fmt: skip
    """Median milliseconds per call, three ways on a GPU: CUDA events, wall clock, CUDA-graph replay.

    Events alone mislead here: they count host time only while the GPU waits, so a host-side gather overlapped
    with the previous call's copy looks free, and launch overhead hides kernel time. Hence all three.
    """
    fn()
    if not cuda:
        return Row(section, case, impl, _wall_ms(fn, cuda, 3), None, None, bytes_moved, err)
    event = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    wall = _wall_ms(fn, cuda, max(3, min(50, int(100 / max(event, 1e-3)))))
    replay = None
    if graph:
        try:
            replay = triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")
        except RuntimeError:  # work that syncs with the host cannot be captured
            torch.cuda.synchronize()
    return Row(section, case, impl, event, wall, replay, bytes_moved, err)


def max_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.float() - expected.float()).abs().max().item()


def bench_scoring(cuda: bool, quick: bool, dev: torch.device) -> list[Row]:
    hq, hkv, tokens, dim, clusters = (4, 2, 3, 64, 17) if quick else (28, 4, 32, 128, 2048)
    query = torch.randn(hq, tokens, dim, device=dev, dtype=torch.bfloat16)
    centroids = torch.randn(clusters, hkv, dim, device=dev)
    variances = torch.rand(clusters, hkv, dim, device=dev)
    log_counts = torch.rand(clusters, device=dev) * 5
    args, scale = (query, centroids, variances, log_counts), dim**-0.5
    case = f"{clusters} clusters, q {hq}x{tokens}, kv {hkv}, d {dim}"
    ref = kernels.cluster_scores_reference(*args, scale=scale)
    err = max_err(kernels.cluster_scores(*args, scale=scale), ref)
    kernel = partial(kernels.cluster_scores, *args, scale=scale)
    reference = partial(kernels.cluster_scores_reference, *args, scale=scale)
    mean_ref = kernels.cluster_scores_reference(*args, scale=scale, use_spread=False)
    mean_err = max_err(kernels.cluster_scores(*args, scale=scale, use_spread=False), mean_ref)
    mean_key = partial(kernels.cluster_scores, *args, scale=scale, use_spread=False)
    return [
        measure("scoring", case, "cluster_scores (triton)", kernel, cuda, err=err),
        measure("scoring", case, "reference (torch bmm)", reference, cuda),
        measure("scoring", case, "cluster_scores mean key (triton)", mean_key, cuda, err=mean_err),
    ]


def _spans(num_tokens: int, span: int, pool_rows: int, gen: torch.Generator) -> tuple[list[int], list[int]]:
    """Non-overlapping spans at random span-aligned places of the pool: clusters scattered in host memory."""
    slots = torch.randperm(pool_rows // span, generator=gen)[: num_tokens // span]
    return (slots * span).tolist(), [span] * len(slots)


def _cpu_gather_then_copy(pool, ids_host, staging, dst):
    torch.index_select(pool, 0, ids_host, out=staging)
    dst.copy_(staging, non_blocking=True)


def _copy_per_row(pool, ids_host, dst):
    for i, row in enumerate(ids_host.tolist()):
        dst[i].copy_(pool[row], non_blocking=True)


def bench_gather(cuda: bool, quick: bool, dev: torch.device) -> list[Row]:
    row_elems, pool_rows, num_tokens = (64, 400, 48) if quick else (1024, 262144, 12544)  # 2 KiB bf16 rows
    pool = torch.randn(pool_rows, row_elems, dtype=torch.bfloat16)
    if cuda:
        pool = pool.pin_memory()
    gpu_pool = pool.to(dev)
    row_bytes = row_elems * pool.element_size()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for span in (8, 4) if quick else (196, 16):
        starts, lengths = _spans(num_tokens, span, pool_rows, gen)
        ids_host = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lengths, strict=True)])
        ids = ids_host.to(dev)
        dst = torch.empty(len(ids_host), row_elems, dtype=pool.dtype, device=dev)
        staging = torch.empty_like(dst, device="cpu", pin_memory=cuda)
        spans = (starts, lengths, dst)
        impls = {
            "one contiguous copy (floor)": partial(dst.copy_, pool[: len(dst)], non_blocking=True),
            "copy per span (copy_spans_reference)": partial(kernels.copy_spans_reference, pool, *spans),
            "gather_spans kernel, reads host (UVA)": partial(kernels.gather_spans, pool, *spans),
            "gather_rows kernel, reads host (UVA)": partial(kernels.gather_rows, pool, ids, dst, validate=False),
            "CPU index_select to pinned, one copy": partial(_cpu_gather_then_copy, pool, ids_host, staging, dst),
            "copy per row": partial(_copy_per_row, pool, ids_host, dst),
            "gather_spans kernel, GPU-resident src": partial(kernels.gather_spans, gpu_pool, *spans),
        }
        case = f"{len(ids_host)} rows x {row_bytes} B, {len(starts)} spans of {span}"
        for name, fn in impls.items():
            dst.fill_(float("nan"))
            fn()
            err = max_err(dst.cpu(), pool[ids_host]) if "floor" not in name else None
            # Host-side loops and syncs cannot be captured; gather_spans uploads its span table from pageable
            # memory, which capture forbids too.
            graph = "per row" not in name and "CPU" not in name and "gather_spans" not in name
            rows.append(measure("gather", case, name, fn, cuda, graph=graph, bytes_moved=dst.nbytes, err=err))
    return rows


def _sdpa(q, k, v, mask=None):  # q [B, Hq, L, D], k/v [B, Hkv, N, D]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def bench_decode(cuda: bool, quick: bool, dev: torch.device) -> list[Row]:
    hq, hkv, dim = (4, 2, 64) if quick else (28, 4, 128)
    dt, scale, rows = torch.bfloat16, dim**-0.5, []
    for batch, max_kv in [(1, 97), (3, 40)] if quick else [(1, 16384), (8, 4096), (32, 4096)]:
        q = torch.randn(batch, hq, dim, device=dev, dtype=dt)
        k, v = (torch.randn(batch, hkv, max_kv, dim, device=dev, dtype=dt) for _ in range(2))
        lens = torch.randint(max_kv // 2, max_kv + 1, (batch,), dtype=torch.int32)
        lens[0] = max_kv
        lens = lens.to(dev)
        mask = (torch.arange(max_kv, device=dev)[None, :] < lens[:, None])[:, None, None, :]
        case = f"decode b{batch} kv{max_kv} (lens {max_kv // 2}..{max_kv})"
        moved = 2 * int(lens.sum()) * hkv * dim * 2
        err = max_err(
            kernels.decode_attention(q, k, v, lens, scale=scale),
            kernels.decode_attention_reference(q, k, v, lens, scale=scale),
        )
        kernel = partial(kernels.decode_attention, q, k, v, lens, scale=scale, validate=False)
        reference = partial(kernels.decode_attention_reference, q, k, v, lens, scale=scale)
        rows += [
            measure("attention", case, "decode_attention (triton split-K)", kernel, cuda, bytes_moved=moved,
                    err=err),
            measure("attention", case, "SDPA (bool mask)", partial(_sdpa, q[:, :, None], k, v, mask), cuda,
                    bytes_moved=moved),
            measure("attention", case, "reference (fp32 torch)", reference, cuda, graph=False, bytes_moved=moved),
        ]  # fmt: skip
    return rows


def _gather_pages_then_sdpa(q, k_pages, v_pages, used, tokens):
    k = k_pages[used].transpose(0, 1).flatten(1, 2)[None, :, :tokens]
    v = v_pages[used].transpose(0, 1).flatten(1, 2)[None, :, :tokens]
    return _sdpa(q[:, :, None], k, v)


def bench_paged(cuda: bool, quick: bool, dev: torch.device) -> list[Row]:
    hq, hkv, dim, tokens = (4, 2, 64, 97) if quick else (28, 4, 128, 16384)
    dt, page, scale = torch.bfloat16, 16, dim**-0.5
    num_used = -(-tokens // page)
    k_pages, v_pages = (torch.randn(num_used * 2, hkv, page, dim, device=dev, dtype=dt) for _ in range(2))
    table = torch.randperm(num_used * 2)[:num_used].to(torch.int32)[None].to(dev)
    lens = torch.tensor([tokens], dtype=torch.int32, device=dev)
    q = torch.randn(1, hq, dim, device=dev, dtype=dt)
    args = (q, k_pages, v_pages, table, lens)
    err = max_err(
        kernels.paged_decode_attention(*args, scale=scale),
        kernels.paged_decode_attention_reference(*args, scale=scale),
    )
    case, moved = f"paged decode kv{tokens} page{page}", 2 * tokens * hkv * dim * 2
    kernel = partial(kernels.paged_decode_attention, *args, scale=scale, validate=False)
    gathered = partial(_gather_pages_then_sdpa, q, k_pages, v_pages, table[0].long(), tokens)
    return [
        measure("attention", case, "paged_decode_attention (triton)", kernel, cuda, bytes_moved=moved, err=err),
        measure("attention", case, "gather pages + SDPA", gathered, cuda, bytes_moved=moved),
    ]


def bench_slots(cuda: bool, quick: bool, dev: torch.device) -> list[Row]:
    """The arena's own layout: a page-major pool ``[P, L, 2, H, page, D]``, one layer's view, a slot table of
    whole pages in random order, against the same keys laid out contiguously; and the two ways a new token's
    KV is written into its page (indexed ``write_slots`` against ``write_run``'s slice copy)."""
    hq, hkv, dim, layers, page, tokens, pool_pages = (
        (4, 2, 64, 2, 18, 97, 16) if quick else (28, 4, 128, 28, 126, 16384, 400)
    )
    dt, scale, rows = torch.bfloat16, dim**-0.5, []
    pool = torch.randn(pool_pages, layers, 2, hkv, page, dim, device=dev, dtype=dt)
    layer = layers // 2
    k_pages, v_pages = pool[:, layer, 0], pool[:, layer, 1]
    used = torch.randperm(pool_pages)[: -(-tokens // page)]
    slots = (used[:, None] * page + torch.arange(page)[None, :]).flatten()[:tokens].to(torch.int32)
    table = slots[None].to(dev)
    k = k_pages[used].transpose(0, 1).flatten(1, 2)[:, :tokens][None].contiguous()
    v = v_pages[used].transpose(0, 1).flatten(1, 2)[:, :tokens][None].contiguous()
    moved = 2 * tokens * hkv * dim * 2
    for q_len in (1, 32):
        q = torch.randn(1, hq, q_len, dim, device=dev, dtype=dt)
        case = f"slots q{q_len} kv{tokens} page{page}"
        paged = partial(kernels.paged_slot_attention, q, k_pages, v_pages, table, None, scale=scale)
        if q_len == 1:
            contiguous = partial(kernels.decode_attention, q[:, :, 0], k, v, None, scale=scale, validate=False)
        else:
            contiguous = partial(kernels.prefill_attention, q[0], k[0], v[0], scale=scale)
        expected = contiguous() if q_len == 1 else contiguous()[None][:, :, -1]
        err = max_err(paged()[:, :, -1], expected)
        rows += [
            measure("slots", case, "paged_slot_attention (triton)", paged, cuda, bytes_moved=moved, err=err),
            measure("slots", case, "contiguous (decode/prefill_attention)", contiguous, cuda, bytes_moved=moved),
        ]
    token_kv = torch.randn(1, 2, hkv, dim, device=dev, dtype=dt)
    target = int(used[0])
    index = (torch.tensor([target], device=dev), torch.tensor([3], device=dev))

    def write_slots():
        pool[index[0], layer, :, :, index[1]] = token_kv

    def write_run():
        pool[target, layer, :, :, 3:4] = token_kv[0, :, :, None]

    rows += [
        measure("slots", "write one token, one layer", "indexed (write_slots)", write_slots, cuda),
        measure("slots", "write one token, one layer", "slice copy (write_run)", write_run, cuda),
    ]
    return rows


def bench_prefill(cuda: bool, quick: bool, dev: torch.device) -> list[Row]:
    hq, hkv, dim = (4, 2, 64) if quick else (28, 4, 128)
    dt, scale, rows = torch.bfloat16, dim**-0.5, []
    for q_len, kv_len in [(5, 97)] if quick else [(32, 16384), (128, 4224), (1024, 1024)]:
        q = torch.randn(hq, q_len, dim, device=dev, dtype=dt)
        k, v = (torch.randn(hkv, kv_len, dim, device=dev, dtype=dt) for _ in range(2))
        visible = torch.ones(q_len, kv_len, dtype=torch.bool, device=dev).tril(kv_len - q_len)
        err = max_err(
            kernels.prefill_attention(q, k, v, scale=scale),
            kernels.prefill_attention_reference(q, k, v, scale=scale),
        )
        case, moved = f"prefill q{q_len} kv{kv_len}", 2 * kv_len * hkv * dim * 2
        impls = {
            "prefill_attention (triton)": partial(kernels.prefill_attention, q, k, v, scale=scale),
            "SDPA (bool mask, bottom-right)": partial(_sdpa, q[None], k[None], v[None], visible),
            "reference (fp32 torch)": partial(kernels.prefill_attention_reference, q, k, v, scale=scale),
        }
        if q_len == kv_len:
            impls["SDPA (is_causal, flash)"] = partial(
                F.scaled_dot_product_attention, q[None], k[None], v[None], is_causal=True, enable_gqa=True
            )
        for name, fn in impls.items():
            rows.append(
                measure("attention", case, name, fn, cuda, bytes_moved=moved, err=err if "triton" in name else None)
            )
    return rows


def bench_slabs(cuda: bool, quick: bool, dev: torch.device) -> list[Row]:
    """One layer of many clusters from pinned host memory into a question buffer: the retrieval gather.

    Sizes as in scenario A at 60 minutes: ~50 clusters of 200-460 tokens (16k tokens), 7B KV layout.
    """
    from mosaic_core.kernels.slab_gather import gather_slabs, gather_slabs_reference

    layers, heads, dim = (3, 2, 32) if quick else (28, 4, 128)
    gen = torch.Generator().manual_seed(0)
    sizes = [int(n) for n in torch.randint(4 if quick else 200, 12 if quick else 460, (50,), generator=gen)]
    pin = cuda
    clusters = [torch.randn(layers, 2, heads, n, dim, generator=gen).to(torch.bfloat16) for n in sizes]
    clusters = [c.pin_memory() if pin else c for c in clusters]
    slabs = [c[1] for c in clusters]
    total = sum(sizes)
    out = torch.empty(2, heads, total, dim, dtype=torch.bfloat16, device=dev)
    expected = torch.cat(slabs, dim=2).to(dev)
    moved = expected.numel() * expected.element_size()
    case = f"{len(sizes)} slabs, {total} tokens, {moved >> 20} MiB"
    rows = [
        measure("slabs", case, "copy_ per slab", lambda: gather_slabs_reference(slabs, out, 0), cuda,
                graph=False, bytes_moved=moved),
    ]  # fmt: skip
    if cuda:
        flat = torch.empty(moved, dtype=torch.uint8, pin_memory=True)
        flat_dst = torch.empty(moved, dtype=torch.uint8, device=dev)
        rows.append(
            measure("slabs", case, "one contiguous copy (PCIe peak)",
                    lambda: flat_dst.copy_(flat, non_blocking=True), cuda, graph=False, bytes_moved=moved)
        )  # fmt: skip
    configs = [(64, 4)] if quick else [(t, w) for t in (32, 64, 128, 256) for w in (2, 4, 8)]
    for block_tokens, num_warps in configs:
        fn = partial(gather_slabs, slabs, out, 0, block_tokens=block_tokens, num_warps=num_warps)
        fn()
        err = max_err(out, expected)
        rows.append(
            measure("slabs", case, f"triton gather T={block_tokens} warps={num_warps}", fn, cuda, graph=False,
                    bytes_moved=moved, err=err)
        )  # fmt: skip
    return rows


def _gbps(nbytes: int, ms: float | None) -> str:
    return "" if not nbytes or not ms else f"{nbytes / ms / 1e6:.1f}"


def print_table(rows: list[Row]) -> None:
    header = (
        f"{'section':<9} {'case':<42} {'implementation':<39} {'event ms':>9} {'wall ms':>9} {'graph ms':>9}"
        f" {'GB/s*':>7} {'max_err':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        wall = "" if r.wall_ms is None else f"{r.wall_ms:.4f}"
        graph = "" if r.graph_ms is None else f"{r.graph_ms:.4f}"
        err = "" if r.max_err is None else f"{r.max_err:.1e}"
        best = r.graph_ms if r.graph_ms is not None else (r.wall_ms if r.wall_ms is not None else r.event_ms)
        print(
            f"{r.section:<9} {r.case:<42} {r.impl:<39} {r.event_ms:>9.4f} {wall:>9} {graph:>9}"
            f" {_gbps(r.bytes_moved, best):>7} {err:>8}"
        )
    print("* bytes moved (gather) or K+V bytes read (attention) over graph ms, else wall ms, else event ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes; runs on CPU in the Triton interpreter")
    parser.add_argument(
        "--only", default="scoring,gather,slabs,decode,paged,slots,prefill", help="comma-separated sections"
    )
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.quick:
        parser.error("no CUDA device: run with --quick (tiny sizes in the Triton interpreter)")
    dev = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    sections = {
        "scoring": bench_scoring,
        "gather": bench_gather,
        "slabs": bench_slabs,
        "decode": bench_decode,
        "paged": bench_paged,
        "slots": bench_slots,
        "prefill": bench_prefill,
    }
    rows: list[Row] = []
    for name in args.only.split(","):
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        rows += sections[name](cuda, args.quick, dev)
    where = torch.cuda.get_device_name() if cuda else "CPU, Triton interpreter (timings meaningless)"
    print(f"device: {where}; torch {torch.__version__}; triton {triton.__version__}")
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))


if __name__ == "__main__":
    main()

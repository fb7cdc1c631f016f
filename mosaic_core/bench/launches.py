"""Host-side work per ingest pass, question prefill and decode step, counted on the CPU.

On the GPU the engine's time at these sizes goes to per-layer Python and kernel launches (bench/NOTES.md), so
what this counts predicts GPU latency without a GPU: the torch ops each phase dispatches (each non-view op is a
kernel launch on CUDA), the host syncs it makes (``.item()``, ``.tolist()``), the tensors it builds from host
data (``torch.tensor``, ``torch.from_numpy``, ``torch.as_tensor``: each is a host->device copy on CUDA), and the
bytes its copying ops write (``COPYING_OPS``: copies, concatenations, indexed reads and writes), which on CUDA
are device-to-device copies, such as a question copying the history it attends to into buffers of its own.
``pool_copied_bytes`` is the part of them read out of the arena's page pools (where the engine has them) into
tensors outside the pools: KV history copied into buffers of its own. Copies from one pool into another are
moves between tiers (spills, fetches, and staging by ``copy_``) and are not in it; staging from the host pool on
the CPU is not even a torch op (``ctypes.memmove``).

Like with like: on the CPU the attention entry points (``attend_paged`` now, ``attend_over`` before the arena, and
``past_logsumexp``, the attention normaliser a share scorer reads) run torch references, where CUDA runs one Triton
kernel. Their calls are counted as ``attention_calls`` and the ops inside them are not counted, nor is their time.
Everything else runs the same code as on the GPU, except that a ``.to(device)`` of a host tensor is free on the CPU
(it shows up here as a host-built tensor instead).

It uses only the engine's public API, so the same script measures an older checkout:

    python -m mosaic_core.bench.launches --out bench/results/cpu-launch-counts-after.json

For an older checkout, copy this file into its ``mosaic_core/bench/`` and run the same command from its root, so
that ``mosaic_core`` is the old package.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import statistics
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

MODES = ("full", "token", "frame", "cluster")
COPYING_OPS = frozenset({
    "aten::copy_", "aten::_to_copy", "aten::cat", "aten::stack", "aten::clone", "aten::index.Tensor",
    "aten::index_select", "aten::gather", "aten::index_put_", "aten::index_put", "aten::_index_put_impl_",
    "aten::slice_scatter", "aten::select_scatter", "aten::scatter_", "aten::masked_scatter_",
})  # fmt: skip
_HOST_BUILDERS = ("tensor", "from_numpy", "as_tensor")


@dataclasses.dataclass(slots=True)
class Counts:
    ops: int = 0  # every aten op dispatched outside attention
    launches: int = 0  # the non-view ones: kernel launches on CUDA
    attention_calls: int = 0
    syncs: int = 0  # .item(), .tolist(), .cpu(): each waits for the device on CUDA
    host_tensors: int = 0  # tensors built from host data
    copied_bytes: int = 0  # bytes written by ``COPYING_OPS``
    pool_copied_bytes: int = 0  # of those, bytes copied out of the page pools into tensors outside them
    blocking_h2d: int = 0  # host-built tensors copied to the device without non_blocking: a device sync on CUDA
    host_s: float = 0.0  # wall time outside attention

    def minus(self, other: Counts) -> Counts:
        return Counts(*(a - b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other), strict=True)))


class Counter(TorchDispatchMode):
    """Counts ops, syncs and host-built tensors; ``paused`` regions (the attention references) are skipped."""

    def __init__(self) -> None:
        super().__init__()
        self.counts = Counts()
        self.paused = 0
        self.per_op: dict[str, int] = {}
        self.copied_by_op: dict[str, int] = {}
        self.pool_storages = lambda: set()  # data pointers of the page pools' storages (``measure_mode`` sets it)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused:
            self.counts.ops += 1
            if not func.is_view:
                self.counts.launches += 1
                name = func.name()
                self.per_op[name] = self.per_op.get(name, 0) + 1
                if name in COPYING_OPS:
                    written = _written_bytes(name, args, out)
                    self.counts.copied_bytes += written
                    pools = self.pool_storages()
                    if _reads_any(name, args, pools) and not _writes_any(name, args, pools):
                        self.counts.pool_copied_bytes += written
                    self.copied_by_op[name] = self.copied_by_op.get(name, 0) + written
            if func is torch.ops.aten._local_scalar_dense.default:
                self.counts.syncs += 1
        return out

    def snapshot(self) -> Counts:
        return dataclasses.replace(self.counts, host_s=time.perf_counter() - self._paused_s)

    @contextlib.contextmanager
    def patched(self, *, dispatch: bool = True):
        """Wraps the attention entry points, ``Tensor.tolist``/``.cpu``/``.to`` and the host tensor builders; with
        ``dispatch`` also counts every op (which slows the host down: time a run without it).

        A copy of host data to the device is blocking on CUDA unless ``non_blocking=True`` (PyTorch waits for the
        stream after a pageable copy), so it is a sync. On the CPU every ``.to(device)`` is a no-op, so the
        tensors that host builders return are remembered, and a ``.to`` of one of them with a device and without
        ``non_blocking`` counts as one blocking copy, as does a host builder called with ``device=``.
        """
        self._paused_s = 0.0
        saved: list[tuple[object, str, object]] = []  # (owner, name, original) of every patched attribute
        self._patch_attention(saved)
        self._patch_syncs(saved)
        self._patch_host_copies(saved)
        try:
            with self if dispatch else contextlib.nullcontext():
                yield self
        finally:
            for owner, name, value in reversed(saved):
                setattr(owner, name, value)

    def _patch_attention(self, saved: list) -> None:
        """Counts the calls of the attention entry points, and pauses the counts and the host clock inside them."""

        def attention(fn):
            def wrapper(*args, **kwargs):
                self.counts.attention_calls += 1
                self.paused += 1
                start = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    self._paused_s += time.perf_counter() - start
                    self.paused -= 1

            return wrapper

        for module_name in ("mosaic_core.engine.plans", "mosaic_core.engine.attend", "mosaic_core.engine.retrieval"):
            module = importlib.import_module(module_name)
            for name in ("attend_paged", "attend_over", "past_logsumexp"):
                if hasattr(module, name):
                    saved.append((module, name, getattr(module, name)))
                    setattr(module, name, attention(getattr(module, name)))

    def _patch_syncs(self, saved: list) -> None:
        """Counts ``Tensor.tolist`` and ``Tensor.cpu`` as syncs."""

        def counted(fn, field):
            def wrapper(*args, **kwargs):
                if not self.paused:
                    setattr(self.counts, field, getattr(self.counts, field) + 1)
                return fn(*args, **kwargs)

            return wrapper

        for name in ("tolist", "cpu"):
            saved.append((torch.Tensor, name, getattr(torch.Tensor, name)))
            setattr(torch.Tensor, name, counted(getattr(torch.Tensor, name), "syncs"))

    def _patch_host_copies(self, saved: list) -> None:
        """Counts the tensors the host builders return, and the blocking copies of them to a device (``patched``)."""
        built = weakref.WeakValueDictionary()  # id -> tensor (tensors compare elementwise, so no WeakSet)

        def builder(fn):
            def wrapper(*args, **kwargs):
                out = fn(*args, **kwargs)
                if not self.paused:
                    self.counts.host_tensors += 1
                    if kwargs.get("device") is not None:
                        self.counts.blocking_h2d += 1
                    else:
                        built[id(out)] = out
                return out

            return wrapper

        def to(fn):
            def wrapper(tensor, *args, **kwargs):
                has_device = kwargs.get("device") is not None or any(isinstance(a, (str, torch.device)) for a in args)
                blocking = has_device and not kwargs.get("non_blocking")
                if not self.paused and blocking and built.get(id(tensor)) is tensor:
                    self.counts.blocking_h2d += 1
                return fn(tensor, *args, **kwargs)

            return wrapper

        saved.append((torch.Tensor, "to", torch.Tensor.to))
        torch.Tensor.to = to(torch.Tensor.to)
        for name in _HOST_BUILDERS:
            saved.append((torch, name, getattr(torch, name)))
            setattr(torch, name, builder(getattr(torch, name)))


def _written_bytes(name: str, args, out) -> int:
    """Bytes a copying op writes: the destination of ``copy_``, the values of an indexed write, else its output."""
    if name == "aten::copy_":
        written = args[0]
    elif name in ("aten::index_put_", "aten::index_put", "aten::_index_put_impl_"):
        written = args[2]
    else:
        written = out
    tensors = written if isinstance(written, (list, tuple)) else [written]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _reads_any(name: str, args, storages: set[int]) -> bool:
    """Whether a copying op reads one of ``storages`` (its sources: not ``copy_``'s or an indexed write's target)."""
    if name == "aten::copy_":
        sources = args[1:2]
    elif name in ("aten::index_put_", "aten::index_put", "aten::_index_put_impl_"):
        sources = args[2:3]
    else:
        sources = args
    flat = [t for a in sources for t in (a if isinstance(a, (list, tuple)) else [a])]
    return any(isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in storages for t in flat)


def _writes_any(name: str, args, storages: set[int]) -> bool:
    """Whether an in-place copying op writes into one of ``storages`` (a functional op writes a new tensor)."""
    if not name.endswith("_"):
        return False
    target = args[0]
    return isinstance(target, torch.Tensor) and target.untyped_storage().data_ptr() in storages


def _pool_storages(engine) -> set[int]:
    """The page pools' storages, where an engine has an arena (older checkouts have none: empty)."""
    pools = getattr(getattr(getattr(engine, "tiering", None), "tiers", None), "pools", None)
    if pools is None:
        return set()
    tensors = [pools.device_pool, *getattr(pools, "host_chunks", [])]
    return {t.untyped_storage().data_ptr() for t in tensors}


def _host_to_device_bytes(engine) -> int | None:
    stats = getattr(getattr(getattr(engine, "tiering", None), "tiers", None), "stats", None)
    return None if stats is None else stats.bytes_by_direction.get("host_to_device")


def _engine(model, mode: str, budget_tokens: int, device_budget_mib: float):
    from mosaic_core.bookkeeping.formation_config import FormationConfig
    from mosaic_core.config import MIB, EngineConfig
    from mosaic_core.engine.engine import Engine

    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    extra = {"page_tokens": 18} if "page_tokens" in fields else {}  # the bikes clip's frames: 18 tokens each
    config = EngineConfig(
        mode=mode, target_tokens_per_frame=16, local_window_tokens=48, retrieval_budget_tokens=budget_tokens,
        device_budget_bytes=int(device_budget_mib * MIB), formation=FormationConfig(max_tokens=48), **extra,
    )  # fmt: skip
    return Engine(model, config)


def measure_mode(
    model,
    frames,
    mode: str,
    *,
    dispatch: bool,
    questions: int,
    decode_tokens: int,
    warm_frames: int,
    budget_tokens: int,
    device_budget_mib: float = 8.0,
) -> dict:
    """Per-pass, per-prefill and per-decode-step counts of one stream's ingest and questions; ``dispatch`` False
    times the same run without counting ops (their counts then read 0)."""
    from mosaic_core.engine.results import FrameInput, TokenEvent

    engine = _engine(model, mode, budget_tokens, device_budget_mib)
    counter = Counter()
    counter.pool_storages = lambda: _pool_storages(engine)
    ingest, prefill, decode, finish = [], [], [], []
    engine.open_stream("cam", fps=4.0)
    with counter.patched(dispatch=dispatch):
        for i, (t, rgb) in enumerate(frames):
            before = counter.snapshot()
            engine.ingest([FrameInput("cam", t, rgb)])
            if i >= warm_frames:
                ingest.append(counter.snapshot().minus(before))
        for q in range(questions):
            before = counter.snapshot()
            events = engine.ask("cam", f"what happened? {q}", max_new_tokens=decode_tokens)
            tokens = 0
            for event in events:
                now = counter.snapshot()
                if isinstance(event, TokenEvent):
                    (prefill if tokens == 0 else decode).append(now.minus(before))
                    tokens += 1
                else:
                    finish.append(now.minus(before))
                before = counter.snapshot()
    engine.close()
    top = sorted(counter.per_op.items(), key=lambda kv: -kv[1])[:15]
    stats = engine.stream_stats("cam")
    return {
        "history_bytes": stats.frames_ingested * (stats.tokens_per_frame or 0) * engine.spec.bytes_per_token,
        "host_to_device_bytes": _host_to_device_bytes(engine),  # every fetch and gather of the run
        "copied_bytes_by_op_all_phases": dict(sorted(counter.copied_by_op.items(), key=lambda kv: -kv[1])),
        "ingest_pass": _summary(ingest),
        "question_prefill": _summary(prefill),
        "decode_step": _summary(decode),
        "answer_end": _summary(finish),
        "launches_by_op_all_phases": dict(top),
    }


def _summary(samples: list[Counts]) -> dict:
    if not samples:
        return {}
    out = {"samples": len(samples)}
    for field in dataclasses.fields(Counts):
        values = [getattr(s, field.name) for s in samples]
        out[field.name] = round(statistics.median(values), 6 if field.name == "host_s" else 1)
    out["host_ms"] = round(out.pop("host_s") * 1e3, 2)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="current")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--frames", type=int, default=40, help="frames of the bikes clip ingested, at 4 fps")
    parser.add_argument("--warm-frames", type=int, default=8, help="first passes left out of the ingest medians")
    parser.add_argument("--questions", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=8)
    parser.add_argument("--budget-tokens", type=int, default=96, help="retrieval budget (the frames are 18 tokens)")
    parser.add_argument("--device-budget-mib", type=float, default=8.0, help="8 holds the whole history on the device")
    parser.add_argument("--out", help="write the JSON here")
    args = parser.parse_args(argv)

    from mosaic_core.model.qwen2_5_vl import Qwen25VLAdapter
    from mosaic_core.model.video import iter_video_frames, sample_clip_path

    torch.manual_seed(0)
    model = Qwen25VLAdapter.from_preset("tiny", device="cpu", dtype=torch.float32)
    clip = sample_clip_path("bikes.mp4")
    frames = [(f.timestamp_s, f.rgb) for f in iter_video_frames(clip, fps=4.0, max_frames=args.frames)]
    result = {"label": args.label, "preset": "tiny", "num_layers": model.kv_spec.num_layers, "args": vars(args)}
    kwargs = dict(questions=args.questions, decode_tokens=args.decode_tokens, warm_frames=args.warm_frames,
                  budget_tokens=args.budget_tokens, device_budget_mib=args.device_budget_mib)  # fmt: skip
    for mode in args.modes.split(","):
        result[mode] = counted = measure_mode(model, frames, mode, dispatch=True, **kwargs)
        timed = measure_mode(model, frames, mode, dispatch=False, **kwargs)
        for phase in ("ingest_pass", "question_prefill", "decode_step", "answer_end"):
            if counted[phase]:
                counted[phase]["host_ms_counted"] = counted[phase].pop("host_ms")
                counted[phase]["host_ms"] = timed[phase]["host_ms"]
        print(mode, json.dumps({k: v for k, v in counted.items() if k != "launches_by_op_all_phases"}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Scenario A, on equal machinery: one long stream, one engine per variant, the same schedule for every variant.

Rows (``VARIANTS``):
- ``full``: everything on the device, no choice (the reference for hidden-state error and KL).
- ``rekv-token``: the faithful ReKV stand-in: one-frame blocks, mean-key scores, one copy per block and layer,
  every layer scoring, nothing cached on the GPU.
- ``frame``: one-frame blocks with mean-key scores on Mosaic's machinery (one-launch gather, layer-1 choice
  shared, GPU cache, scoring kernel). ``frame`` vs ``cluster`` is what the retrieval unit alone buys.
- ``cluster``: Mosaic.
- ``random``: cluster machinery choosing clusters at random (chance, with the same bytes-per-unit profile).
- on request only (``--variants``): ``cluster-eager``, cluster mode with the prefill and decode graphs off; and
  ``cluster-one-graph``, the prefill's later layers in one graph that waits for every layer's retrieved KV before
  it starts (``EngineConfig.prefill_graph_layers``), where ``cluster`` replays a chain of graphs of 4 layers;
  ``cluster-kernel-copy``, staging by the slab-gather kernel on the SMs, where ``cluster`` and ``frame`` stage
  on the copy engines (``EngineConfig.staging_copy``); ``cluster-eager-anchor``, the layers up to the anchor run
  eagerly, where ``cluster`` replays them from graphs cut where they choose (``EngineConfig.anchor_graphs``);
  ``cluster-spill-copies``, clusters that complete on a nearly full device get no host copy then, so the room a
  question takes copies them to the host in its own time (``EngineConfig.host_copy_below_device_free`` 0);
  ``cluster-two-copy-streams``, a question's staging runs dealt to two streams (``EngineConfig.staging_streams``);
  ``cluster-copy-a-call``, one ``cudaMemcpyAsync`` a staging run where ``cluster`` hands each group's runs over in
  one ``cudaMemcpyBatchAsync`` (``EngineConfig.staging_batch``);
  ``cluster-groups-of-4``, staging copies of 4 layers a time where ``cluster`` copies 8, 8, 6 and then 4
  (``EngineConfig.staging_groups``; ``cluster``'s before session 45); ``cluster-tapered-staging``, 8, 8, 6 and 4
  layers (the default since session 45, named for runs before it); ``cluster-tapered-two-streams``, those dealt to
  two streams; ``cluster-per-token``, clusters ranked
  by estimated attention mass per token (``spread_per_token``) where ``cluster`` ranks by total mass (``spread``);
  ``cluster-spread``, clusters ranked by the Gaussian estimate of their attention mass, the largest row's for each
  kv head (``spread``, cluster mode's scorer until session 34), where ``cluster`` ranks by each query row's
  estimated share of attention summed over the rows, per token (``spread_share_per_token``);
  ``cluster-anchor-3``, layers 0-3 choose their own clusters and later layers take layer 3's choice, where
  ``cluster`` shares layer 1's (``EngineConfig.prefetch_after_layer``); ``cluster-anchor-0``, every layer takes layer
  0's choice, so a question reads scores back once, and one layer's pages, not two, go in runs of a single layer (an
  anchor's own layer is staged alone; the later layers' pages go in runs of ``staging_groups`` layers);
  ``cluster-key-formation``, frames join a cluster by the similarity of their keys at the choosing layer, not of
  their pictures (``FormationConfig.key_weight`` 1), so a cluster's keys are alike and its Gaussian summary fits
  them better; ``cluster-small-units``, clusters of at most 504 tokens (4 frames of 126) where ``cluster``'s hold up
  to 2,048, so the unit is nearer the tokens it stands for (``FormationConfig.max_tokens``).

Schedule, identical for every variant so that question i sees the same stream in every engine: ingest all but the
last ``num_questions * gap`` frames (scenario C's checkpoints on the way), one warm-up question, then
``num_questions`` distinct questions, each after ``gap`` more frames. Then, on the final stream, the fidelity
questions (their recall probes synchronise and read the whole history, so they are never timed):
``recall_questions`` real questions with the scorer sweep, and ``probes`` planted-attention probes at fixed
random spans. Bytes per question count everything moved during the answer call: the retrieval, then the
promotion and merges it triggers.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import random
import statistics
import time

import torch

from mosaic_core.bench.stats import percentile
from mosaic_core.config import EngineConfig
from mosaic_core.engine.engine import Engine
from mosaic_core.engine.probes import ENGINE, ProbeRequest, next_token_kl, probing

VARIANTS = {
    "full": {"mode": "full"},
    "rekv-token": {"mode": "token"},
    "frame": {"mode": "frame"},
    "cluster": {"mode": "cluster"},
    "random": {"mode": "cluster", "scorer": "random"},
    # cluster mode without CUDA graphs for the question prefill and decode: what the graphs buy, on request only
    "cluster-eager": {"mode": "cluster", "prefill_graphs": False, "decode_graphs": False},
    "cluster-one-graph": {"mode": "cluster", "prefill_graph_layers": 64},
    "cluster-kernel-copy": {"mode": "cluster", "staging_copy": "kernel"},
    "cluster-eager-anchor": {"mode": "cluster", "anchor_graphs": False},
    "cluster-spill-copies": {"mode": "cluster", "host_copy_below_device_free": 0.0},
    "cluster-two-copy-streams": {"mode": "cluster", "staging_streams": 2},
    "cluster-copy-a-call": {"mode": "cluster", "staging_batch": False},
    "cluster-groups-of-4": {"mode": "cluster", "staging_groups": (4,)},
    "cluster-tapered-staging": {"mode": "cluster", "staging_groups": (8, 8, 6, 4)},
    "cluster-tapered-two-streams": {"mode": "cluster", "staging_groups": (8, 8, 6, 4), "staging_streams": 2},
    "cluster-per-token": {"mode": "cluster", "scorer": "spread_per_token"},
    "cluster-spread": {"mode": "cluster", "scorer": "spread"},
    "cluster-anchor-3": {"mode": "cluster", "prefetch_after_layer": 3},
    "cluster-anchor-0": {"mode": "cluster", "prefetch_after_layer": 0},
    # a mapping changes those fields of the bench's own FormationConfig
    "cluster-key-formation": {"mode": "cluster", "formation": {"key_weight": 1.0}},
    "cluster-small-units": {"mode": "cluster", "formation": {"max_tokens": 504}},
}
DEFAULT_VARIANTS = ("full", "rekv-token", "frame", "cluster", "random")
SWEEP = ("spread", "spread_per_token", "spread_share", "spread_share_per_token", "mean_key", "random", "recent")
BUDGET_FRACTIONS = (0.01, 0.02, 0.05, 0.10)  # planted probes are also scored at these shares of the history
_SUBJECTS = ("cyclist", "red car", "person in a jacket", "dog", "bus", "delivery van", "child", "truck")
_TEMPLATES = ("When did the {} pass the camera?", "Was there a {} near the road?", "How often did a {} appear?")
QUESTIONS = [t.format(s) for t in _TEMPLATES for s in _SUBJECTS]  # 24 distinct questions


def run(
    model, s, frames, pcie_gbs: float, bare_ms: float, log, *, engine_config, pinned_bytes, save=None, variants=None
):
    """Every variant in turn (or those named in ``variants``); returns ``(rows, scaling)`` and calls ``save``
    after each variant. Without ``full`` among them, no row has hidden-state error or KL."""
    total = len(frames)
    gap = max(1, min(8, total // (4 * max(1, s.num_questions))))
    bulk = total - s.num_questions * gap
    history_bytes = total * s.tokens_per_frame * model.kv_spec.bytes_per_token
    spans = _probe_spans(bulk, s, seed=0)
    rows, scaling, hidden = {}, {}, {}
    for label in VARIANTS:
        if label not in (DEFAULT_VARIANTS if variants is None else variants):
            continue
        config = variant_config(label, lambda mode: engine_config(s, mode), pinned_bytes(history_bytes, s))
        started = time.perf_counter()
        engine = Engine(model, config)
        engine.open_stream("cam")
        _reset_peak(s)
        ingest_s = _ingest(engine, frames, 0, bulk, s, scaling.setdefault(label, []), log, label)
        for question in ("Describe the scene.", max(QUESTIONS, key=len)):  # warm-up: kernels, each length's graphs
            engine.answer("cam", question, max_new_tokens=2)
        timed, hidden[label] = [], []
        for i in range(s.num_questions):
            t0 = time.perf_counter()
            engine.ingest(frames[bulk + i * gap : bulk + (i + 1) * gap])
            ingest_s += time.perf_counter() - t0
            row, last_hidden = _ask(engine, s, QUESTIONS[i % len(QUESTIONS)])
            timed.append(row)
            hidden[label].append(last_hidden)
        # before the fidelity questions: their recall probes copy the whole history's keys to the device
        peak = torch.cuda.max_memory_allocated() if s.device.startswith("cuda") else 0
        budgets = tuple(round(f * total * engine.stream_stats("cam").tokens_per_frame) for f in BUDGET_FRACTIONS)
        fidelity = _fidelity(engine, s, spans, budgets, measure=label != "full")
        rows[label] = _summary(label, config, timed, fidelity, peak, total / ingest_s, pcie_gbs, bare_ms)
        rows[label]["units"] = len(engine.clusters("cam"))
        pools = {"prefill": engine.parts.prefill_graphs.graph_pool, "decode": engine.parts.decode_graphs.graph_pool}
        rows[label]["graph_captures"] = {k: [pool.num_captured, round(pool.capture_s, 3)] for k, pool in pools.items()}
        rows[label]["history_tokens"] = total * engine.stream_stats("cam").tokens_per_frame  # 126 per frame here
        rows[label]["variant_s"] = time.perf_counter() - started
        log(f"A/{label}: {json.dumps(rows[label])}")
        del engine
        gc.collect()  # an engine's reference cycles would keep its pools and graphs in the next variant's peak
        if s.device.startswith("cuda"):
            torch.cuda.empty_cache()
        _divergence(model, rows, hidden)
        if save is not None:
            save(rows, scaling)
    return rows, scaling


def variant_config(label: str, config_of_mode, pinned_host_bytes: int) -> EngineConfig:
    """``VARIANTS[label]`` over the bench's config of its mode (``config_of_mode(mode)``), with host memory for the
    history pinned up front where a choice moves it (every mode but full)."""
    overrides = VARIANTS[label]
    base = config_of_mode(overrides["mode"])
    settings = {k: v for k, v in overrides.items() if k not in ("mode", "scorer")}
    if isinstance(settings.get("formation"), dict):
        settings["formation"] = dataclasses.replace(base.formation, **settings["formation"])
    config = dataclasses.replace(base, scorer=overrides.get("scorer"), **settings)
    if config.mode.value != "full":
        config = dataclasses.replace(config, pinned_host_bytes=pinned_host_bytes)
    return config


def _ingest(engine, frames, start, end, s, scaling, log, label) -> float:
    """Ingests ``frames[start:end]``, asking two questions at each of scenario C's checkpoints on the way."""
    ingest_s, done = 0.0, start
    for checkpoint in [int(m * 60) for m in s.checkpoints_min if start < int(m * 60) <= end] + [end]:
        t0 = time.perf_counter()
        for i in range(done, checkpoint, 64):
            engine.ingest(frames[i : min(i + 64, checkpoint)])
            log(f"A/{label}: ingested {min(i + 64, checkpoint)}/{len(frames)} frames")
        ingest_s += time.perf_counter() - t0
        done = checkpoint
        if checkpoint != end:
            ttfts = [_ask(engine, s, q)[0]["ttft_s"] for q in ("Scaling check one.", "Scaling check two.")]
            peak = torch.cuda.max_memory_allocated() if s.device.startswith("cuda") else 0
            scaling.append({"minutes": checkpoint / 60, "ttft_s": statistics.median(ttfts), "peak_bytes": peak})
    return ingest_s


def _ask(engine: Engine, s, question: str) -> tuple[dict, torch.Tensor]:
    stats = engine.tiering.tiers.stats
    bytes_before, copies_before = sum(stats.bytes_by_direction.values()), sum(stats.copies_by_direction.values())
    answer = engine.answer("cam", question, max_new_tokens=s.max_new_tokens)
    r, tm = answer.retrieval, answer.timings
    return {
        "ttft_s": tm.time_to_first_token_s,
        "setup_s": tm.setup_s,  # part of ttft_s (before session 27 the engine's TTFT left it out)
        "decode_s_per_token": tm.decode_s_per_token,
        "bytes": r.bytes_fetched,
        "bytes_all": sum(stats.bytes_by_direction.values()) - bytes_before,  # + promotion, merges, their spills
        "copies": r.num_copies,
        "copies_all": sum(stats.copies_by_direction.values()) - copies_before,
        "hits": r.device_hits,
        "lookups": r.device_lookups,
        "transfer_s": r.transfer_s,
        "transfer_parts": r.transfer_parts,
        "layers_scored": r.num_layers_scored,
    }, answer.last_hidden


def _probe_spans(bulk: int, s, *, seed: int) -> list[tuple[int, int]]:
    """Fixed random spans of ``probe_span_frames`` frames inside the history every variant has stored."""
    rng = random.Random(seed)
    last_start = bulk - s.probe_span_frames - s.window_tokens // max(1, s.tokens_per_frame) - 2
    starts = sorted(rng.randrange(0, max(1, last_start)) for _ in range(s.probes))
    return [(a, a + s.probe_span_frames - 1) for a in starts]


def _fidelity(engine: Engine, s, spans, budgets: tuple[int, ...], *, measure: bool) -> dict:
    if not measure:
        return {}
    recall: dict[str, list[float]] = {}
    for question in QUESTIONS[-s.recall_questions :] if s.recall_questions else []:
        with probing(ProbeRequest(sweep_scorers=SWEEP)) as request:
            engine.answer("cam", question, max_new_tokens=1)
        for name, value in request.recall.items():
            recall.setdefault(name, []).append(value)
    found: dict[str, list[float]] = {}
    found_at: dict[str, list[float]] = {}
    masses = []
    for span in spans:
        with probing(ProbeRequest(span=span, sweep_scorers=SWEEP, sweep_budgets=budgets)) as request:
            engine.answer("cam", "Planted probe.", max_new_tokens=1)
        for name, value in request.span_found.items():
            found.setdefault(name, []).append(value)
        for (name, budget), value in request.span_found_at.items():
            found_at.setdefault(f"{name}@{budget}", []).append(value)
        masses.append(request.span_mass)
    return {
        "recall": {k: statistics.mean(v) for k, v in recall.items()},
        "probe_found": {k: statistics.mean(v) for k, v in found.items()},
        "probe_found_at": {k: statistics.mean(v) for k, v in found_at.items()},
        "probe_span_mass": statistics.mean(masses) if masses else None,
    }


def _summary(label, config: EngineConfig, rows, fidelity, peak, ingest_fps, pcie_gbs, bare_ms) -> dict:
    ttfts = [r["ttft_s"] for r in rows]
    moved = sum(r["bytes"] for r in rows)
    transfer_s = sum(r["transfer_s"] for r in rows)
    bytes_q = statistics.mean(r["bytes"] for r in rows)
    recall = fidelity.get("recall", {})
    found = fidelity.get("probe_found", {})
    return {
        "mode": config.mode.value,
        "scorer": config.scorer,
        "ttft_p50_ms": percentile(ttfts, 0.5) * 1e3,
        "ttft_p95_ms": percentile(ttfts, 0.95) * 1e3,
        "setup_p50_ms": percentile([r["setup_s"] for r in rows], 0.5) * 1e3,
        "decode_ms_per_token": statistics.median(r["decode_s_per_token"] for r in rows) * 1e3,
        "bytes_per_question": bytes_q,
        "bytes_all_per_question": statistics.mean(r["bytes_all"] for r in rows),
        "copies_per_question": statistics.mean(r["copies"] for r in rows),
        "copies_all_per_question": statistics.mean(r["copies_all"] for r in rows),
        "transfer_gbs": moved / transfer_s / 1e9 if transfer_s > 0 else None,
        "transfer_by_part": _transfer_by_part(rows),
        "hit_ratio": sum(r["hits"] for r in rows) / sum(r["lookups"] for r in rows)
        if sum(r["lookups"] for r in rows)
        else None,
        "layers_scored": rows[0]["layers_scored"],
        "peak_gpu_bytes": peak,
        "ingest_frames_per_s": ingest_fps,
        "floor_ms": (bytes_q / (pcie_gbs * 1e9) if pcie_gbs else 0.0) * 1e3 + bare_ms,
        "recall": recall.get(ENGINE) if label != "full" else 1.0,
        "recall_by_scorer": recall,
        "probe_found": found.get(ENGINE) if label != "full" else 1.0,
        "probe_found_by_scorer": found,
        "probe_found_at": fidelity.get("probe_found_at", {}),
        "probe_span_mass": fidelity.get("probe_span_mass"),
    }


def _divergence(model, rows: dict, hidden: dict) -> None:
    """Hidden-state error and next-token KL(full || variant) per question, averaged, for every finished row."""
    if "full" not in hidden:
        return
    for label, states in hidden.items():
        errors, kls = [], []
        for ref, got in zip(hidden["full"], states, strict=True):
            errors.append(float(torch.linalg.vector_norm(got - ref) / torch.linalg.vector_norm(ref)))
            kls.append(next_token_kl(model, ref, got))
        rows[label]["hidden_rel_error"] = statistics.mean(errors)
        rows[label]["kl_vs_full"] = statistics.mean(kls)


def _reset_peak(s) -> None:
    if s.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def _transfer_by_part(rows) -> dict[str, dict[str, float]]:
    """Per part of the questions' staging (``Retriever.transfer_parts``; all of it in the prefill, since scenario A
    does not re-score while decoding): its share of the bytes, its rate with and
    without the host's preparation (GB/s), and the copies handed to CUDA a question."""
    totals: dict[str, list[float]] = {}
    for r in rows:
        for part, figures in r.get("transfer_parts", {}).items():
            total = totals.setdefault(part, [0.0, 0.0, 0.0, 0.0])
            for i, figure in enumerate(figures):
                total[i] += figure
    all_bytes = sum(total[0] for total in totals.values())
    return {
        part: {
            "bytes_share": num_bytes / all_bytes if all_bytes else 0.0,
            "gbs": num_bytes / seconds / 1e9 if seconds > 0 else None,
            "copy_gbs": num_bytes / copy_seconds / 1e9 if copy_seconds > 0 else None,
            "copies_per_question": copies / len(rows),
        }
        for part, (num_bytes, seconds, copy_seconds, copies) in totals.items()
    }

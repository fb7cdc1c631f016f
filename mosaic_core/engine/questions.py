"""Answering a question about one stream: prefill with retrieval, greedy decode, evidence, maintenance.

The question and its answer are transient: their KV is dropped when the answer ends, and the stream's own KV
(sink, clusters, window) is unchanged, except that retrieval may have moved clusters between tiers and
maintenance may have merged clusters that questions keep retrieving together.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import defaultdict
from collections.abc import Iterator

import torch
from torch.profiler import record_function

from mosaic_core.config import RetrievalMode, check_max_new_tokens
from mosaic_core.engine.machinery import machinery_for
from mosaic_core.engine.maintenance import apply_merges
from mosaic_core.engine.parts import EngineParts
from mosaic_core.engine.plans import QuestionPlan
from mosaic_core.engine.prefill_graphs import padded_length
from mosaic_core.engine.probes import QueryPlanter, active_request
from mosaic_core.engine.recall_probe import RecallProbe
from mosaic_core.engine.results import Answer, AnswerTimings, EvidenceSpan, RetrievalStats, TokenEvent
from mosaic_core.engine.retrieval import Retriever
from mosaic_core.engine.splits import observe_and_split, splits_on
from mosaic_core.engine.stream import StreamState
from mosaic_core.engine.tiering import DeviceRoom
from mosaic_core.errors import InvalidArgumentError, OutOfRangeError
from mosaic_core.memory.transfer import upload

log = logging.getLogger(__name__)

_QUESTION_NUMBERS = itertools.count()


def ask(
    parts: EngineParts,
    state: StreamState,
    question: str,
    *,
    max_new_tokens: int,
    time_range: tuple[float, float] | None,
    measure_recall: bool,
    profile: bool = False,
) -> Iterator[TokenEvent | Answer]:
    asked_s = time.perf_counter()  # the time to first token counts from here: the set-up below is part of it
    state.check_open()
    config = parts.config
    question_ids = _check_question(parts, question, max_new_tokens)
    candidates = _candidates(parts, state, time_range)
    retriever = Retriever(
        machinery=machinery_for(config),
        spec=parts.spec,
        tiering=parts.tiering,
        stream=state,
        candidates=candidates,
        budget_tokens=config.retrieval_budget_tokens,
        # distinct per question and stream state, repeatable across runs and engines (random scorer only)
        seed=(state.frames_ingested * 1_000_003 + sum(question_ids) * 131 + len(question_ids)) % (1 << 31),
        profile=profile,
    )
    request = active_request()  # measurement hook (mosaic_core.engine.probes); None when serving
    planter = None
    if request is not None and request.span is not None and candidates:
        planter = QueryPlanter(state, parts.tiering, candidates, parts.spec, request)
    probe = None
    if measure_recall or request is not None:
        probe = RecallProbe(
            state,
            parts.tiering,
            candidates=candidates,
            budget_tokens=config.retrieval_budget_tokens,
            spec=parts.spec,
            retriever=retriever,
            request=request,
            planter=planter,
        )

    def make_plan(room: DeviceRoom) -> QuestionPlan:
        return QuestionPlan(
            state,
            retriever,
            rescore_every_tokens=config.rescore_every_tokens,
            # room for the question padded to a prefill graph's length, whose pad rows the answer overwrites
            capacity_tokens=max(len(question_ids) + max_new_tokens, padded_length(len(question_ids))),
            room=room,
            widest_tokens=widest_question_tokens(config, state),
            recall_probe=probe,
            plant_queries=None if planter is None else planter.plant,
        )

    return _generate(parts, state, question, question_ids, make_plan, retriever, max_new_tokens, asked_s, request)


def _generate(
    parts, state, question, question_ids, make_plan, retriever, max_new_tokens, asked_s, request=None
) -> Iterator[TokenEvent | Answer]:
    # The question's device pages are taken once the caller starts reading the answer, and given back however
    # it ends (answered, abandoned for a deadline or a cancel, or its stream deleted).
    state.check_open()  # closed between the ask and the first read of its answer: no history left to read
    room = DeviceRoom(parts.tiering, f"{state.stream_id}:question:{next(_QUESTION_NUMBERS)}")
    plan = None
    try:
        plan = make_plan(room)
        decoded = yield from _decode(parts, state, question_ids, plan, max_new_tokens, asked_s)
    finally:
        if plan is not None:
            plan.wait_for_gathers()  # a pass that raised may have left staging copies in flight into its pages
            parts.decode_graphs.leave(plan)  # before its pages go: no batched step may write them after
        retriever.release()
        room.release()
    token_ids, timings, retrieval, last_hidden = decoded
    if request is not None and plan.recall_probe is not None:
        plan.recall_probe.report(request)
    _after_the_answer("caching what it retrieved", plan.retriever.promote, state)
    evidence = _evidence(state, plan, parts.config.evidence_spans)
    _after_the_answer("merging and splitting what it retrieved", lambda: _maintain(parts, state, plan), state)
    yield Answer(
        stream_id=state.stream_id,
        question=question,
        text=parts.model.decode_tokens(token_ids),
        token_ids=token_ids,
        evidence=evidence,
        timings=timings,
        retrieval=retrieval,
        last_hidden=last_hidden,
    )


def _decode(parts, state, question_ids, plan, max_new_tokens, asked_s):
    """The question's forward pass and its decode steps, yielding each ``TokenEvent``; returns
    ``(token_ids, timings, retrieval stats, last hidden state)``. ``asked_s``: when the engine was asked, by
    ``time.perf_counter()``."""
    model = parts.model
    timings = AnswerTimings()
    start = time.perf_counter()
    timings.setup_s = start - asked_s
    cursor = state.text_cursor
    token_ids: list[int] = []
    reached = _recorded_event(model.device)
    input_ids = upload([question_ids], torch.long, model.device)  # queued: the ingest work ahead is not waited for
    hidden = parts.prefill_graphs.prefill(plan, input_ids, cursor)  # the last token's, [1, hidden]
    with record_function("question.first_token"):  # a profiler range: ``mosaic bench profile --bare``
        # both results cross to the host behind one wait, not one each
        next_token = model.logits(hidden).argmax(-1).to("cpu", non_blocking=True)
        last_hidden = hidden[0].float().to("cpu", non_blocking=True)
        answered = _recorded_event(model.device)
        _sync(model.device)
        next_id = int(next_token[0])
    timings.time_to_first_token_s = time.perf_counter() - asked_s
    if reached is not None:
        timings.first_token_device_s = reached.elapsed_time(answered) / 1e3
    timings.score_s, timings.fetch_s = plan.retriever.stage_seconds()
    timings.retrieval_s = timings.score_s + timings.fetch_s
    cursor += len(question_ids)
    decode_start = time.perf_counter()
    batched = parts.decode_graphs  # steps this answer with every other one running, from CUDA graphs
    graphed = batched.start(plan)  # False: eager steps
    while True:
        token_ids.append(next_id)
        last = next_id in model.eos_token_ids or len(token_ids) >= max_new_tokens
        if graphed and not last:
            batched.offer(plan, next_id, cursor)  # before the yield: another answer's step may run this one's
        yield TokenEvent(next_id, model.decode_tokens([next_id]))
        if last:
            break
        stepped = batched.step(plan) if graphed else None
        if stepped is None:
            graphed = False  # its graph could not be captured
            hidden = model.forward(
                input_ids=upload([[next_id]], torch.long, model.device),
                position_ids=model.text_positions(cursor, 1)[:, None],
                plan=plan,
            )
            stepped = int(model.logits(hidden[:, -1]).argmax(-1).item())
        cursor += 1
        next_id = stepped
    _sync(model.device)
    timings.decode_s = time.perf_counter() - decode_start
    timings.num_tokens = len(token_ids)
    retrieval = _retrieval_stats(plan)
    return token_ids, timings, retrieval, last_hidden


def widest_question_tokens(config, state: StreamState) -> int:
    """The most slots a table of a question on ``state`` can hold outside full mode: the stream's sink, a full
    local window, the whole retrieval budget, and the longest question and answer the engine takes."""
    question_and_answer = max(
        config.max_question_tokens + config.max_new_tokens_limit, padded_length(config.max_question_tokens)
    )
    return state.sink_tokens + config.local_window_tokens + config.retrieval_budget_tokens + question_and_answer


def _check_question(parts, question: str, max_new_tokens: int) -> list[int]:
    if not isinstance(question, str) or not question.strip():
        raise InvalidArgumentError("the question is empty; ask something about the stream")
    check_max_new_tokens(max_new_tokens, parts.config.max_new_tokens_limit)
    ids = parts.model.question_ids(question)
    check_question_length(len(ids), parts.config.max_question_tokens)
    return ids


def check_question_length(num_tokens: int, max_question_tokens: int) -> None:
    """Refuses a question of ``num_tokens`` (``question_ids``, chat template included) past the engine's limit.

    Raises:
        InvalidArgumentError: the question is longer than ``max_question_tokens``.
    """
    if num_tokens > max_question_tokens:
        raise InvalidArgumentError(f"the question is {num_tokens} tokens long; the limit is {max_question_tokens}")


def _candidates(parts, state: StreamState, time_range) -> list[str]:
    tracked = parts.tiering.residency.tracked_ids()
    records = [r for r in state.former.records_to_read() if r.cluster_id in tracked]
    if time_range is None:
        return [r.cluster_id for r in records]
    start_s, end_s = time_range
    if not start_s <= end_s:
        raise InvalidArgumentError(f"time range start {start_s} is after its end {end_s}")
    first, last = state.first_timestamp_s, state.last_timestamp_s
    if first is None or end_s < first or start_s > last:
        held = "nothing yet" if first is None else f"{first:.3f}s to {last:.3f}s"
        raise OutOfRangeError(
            f"time range {start_s:.3f}s to {end_s:.3f}s is outside what stream {state.stream_id!r} holds ({held})"
        )
    return [r.cluster_id for r in records if r.start_s <= end_s and r.end_s >= start_s]


def _retrieval_stats(plan) -> RetrievalStats:
    """This question's own counts, kept by its retriever: right even when other questions interleave with it."""
    retriever = plan.retriever
    first = plan.selection_history[0] if plan.selection_history else []
    retrieved = {cid for sel in first if sel is not None for cid in sel.cluster_ids}
    tokens = [sel.num_tokens for sel in first if sel is not None]
    transfers = retriever.transfer_parts()  # waits for the copies to finish
    return RetrievalStats(
        num_clusters_retrieved=len(retrieved),
        num_tokens_retrieved=max(tokens, default=0),
        num_layers_scored=sum(1 for sel in first if sel is not None and sel.scores is not None),
        bytes_fetched=retriever.bytes_fetched,
        num_copies=retriever.num_copies,
        device_hits=retriever.device_hits,
        device_lookups=retriever.device_lookups,
        transfer_s=sum(part.seconds for part in transfers.values()),
        transfer_parts={
            name: (part.bytes, part.seconds, part.copy_seconds, part.copies) for name, part in transfers.items()
        },
        attention_recall=None if plan.recall_probe is None else plan.recall_probe.recall,
        decode_attention_recall=None if plan.recall_probe is None else plan.recall_probe.decode_recall,
    )


def _evidence(state: StreamState, plan: QuestionPlan, limit: int) -> list[EvidenceSpan]:
    """Clusters ranked by the attention mass their summaries promise, averaged over layers and re-scorings."""
    mass: dict[str, float] = defaultdict(float)
    num_scored = 0
    candidates = plan.retriever.candidates
    for selections in plan.selection_history:
        for selection in selections:
            if selection is None:
                continue
            num_scored += 1
            if selection.scores is None:
                continue  # a layer that reused another layer's choice adds no evidence of its own
            probabilities = selection.probabilities(candidates)
            for cluster_id in selection.cluster_ids:
                mass[cluster_id] += probabilities.get(cluster_id, 0.0)
    from mosaic_core.engine.keyframe_store import held_keyframes  # here: this function is keyframes' only use

    records = state.records()
    keyframes = held_keyframes(state)
    ranked = sorted(mass.items(), key=lambda item: (-item[1], item[0]))[:limit]
    # A cluster that joined a recurring scene is several spans: one EvidenceSpan each, sharing id, score and rank,
    # each with the keyframes that lie inside it.
    return [
        EvidenceSpan(
            stream_id=state.stream_id,
            cluster_id=cluster_id,
            start_s=start_s,
            end_s=end_s,
            score=score / max(1, num_scored),
            rank=rank,
            keyframe_ids=keyframes.ids_in(cluster_id, start_s, end_s) if keyframes is not None else [],
        )
        for rank, (cluster_id, score) in enumerate(ranked, start=1)
        if cluster_id in records
        for start_s, end_s in records[cluster_id].spans()
    ]


def _after_the_answer(what: str, upkeep, state: StreamState) -> None:
    """Runs upkeep the answer does not depend on; its failure (a disk that refuses a spill, a pinned allocation
    that fails) is logged, and the answer, streamed already, still ends with its evidence."""
    try:
        upkeep()
    except Exception:
        log.exception("stream %s: %s after a question failed; the answer stands", state.stream_id, what)


def _maintain(parts, state: StreamState, plan: QuestionPlan) -> None:
    """Feeds what the question retrieved to maintenance: the splits it makes due (when on), then the merges it
    proposes."""
    if not plan.selection_history or parts.config.mode is not RetrievalMode.CLUSTER or state.closed:
        return
    first = [sel for sel in plan.selection_history[0] if sel is not None]
    # A cluster counts as retrieved when at least half of the layers chose it.
    votes: dict[str, int] = defaultdict(int)
    for selection in first:
        for cluster_id in selection.cluster_ids:
            votes[cluster_id] += 1
    retrieved = [cid for cid, n in votes.items() if 2 * n >= len(first)]
    if splits_on(parts):  # before merges, which may replace what the question retrieved
        observe_and_split(parts, state, plan.choice_query, retrieved)
        held = state.records()
        retrieved = [cid for cid in retrieved if cid in held]
    apply_merges(parts, state, retrieved)


def _recorded_event(device: torch.device) -> torch.cuda.Event | None:
    """A timing event recorded on the current stream (None off CUDA)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def _sync(device: torch.device) -> None:
    """Waits for the question's work: its stream's (which waits for the moves it reads), not the whole device's,
    where ingest work may be queued alongside (``ingest_pauses``)."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()

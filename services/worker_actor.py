"""A worker as a Ray actor: ``WorkerCore`` with fractional CPU (no GPU here) or ``worker_gpus`` GPUs,
``max_restarts``, threads for answers (``answer_threads``) and threads of their own for every other call, so answers
never hold up frames, telemetry or cancels."""

from __future__ import annotations

import time

from services.config import ServiceConfig
from services.worker import WorkerCore

MAX_RESTARTS = 3
# The worker's calls other than answers (``ask`` runs in ``ANSWER_GROUP``, ``answer_threads`` threads) and the
# router's polls (``TELEMETRY_GROUP``): frames, stream calls, cancels, the watch long-poll and the shutdown.
CONTROL_THREADS = 10
ANSWER_GROUP = "answers"
# The router's polls (``drain_telemetry``, ``keyframe_stats``, ``stream_ids``) run on threads of their own: the
# control threads' calls that wait for the engine thread (a second a call at 128 cameras) could hold all ten while
# the poll's 5 s ran out, and the router counted a busy worker down (``telemetry_call``).
TELEMETRY_GROUP = "telemetry"
TELEMETRY_THREADS = 2
# ``start_state``, which the router asks while the worker's start (on a thread of its own) runs.
START_GROUP = "start"
START_THREADS = 1


def send_ask(worker, question_id, stream_id, question, max_new_tokens, time_range, timeout_s: float):
    """Asks a worker actor for one stream's answer as the router does: on its answer threads, with the wall clock
    the ask was sent at (``WorkerCore.ask``). Returns the Ray streaming generator of the answer's events."""
    return worker.ask.options(concurrency_group=ANSWER_GROUP).remote(
        question_id, stream_id, question, max_new_tokens, time_range, timeout_s, time.time()
    )


def telemetry_call(method):
    """A worker actor's poll method (``drain_telemetry``, ``keyframe_stats``, ``stream_ids``) on its telemetry
    threads, ready for ``.remote()``."""
    return method.options(concurrency_group=TELEMETRY_GROUP)


def start_state_call(worker):
    """A worker actor's ``start_state`` on its ``START_GROUP`` thread, which answers while the start runs on
    another; ready for ``.remote()``."""
    return worker.start_state.options(concurrency_group=START_GROUP)


def worker_concurrency_groups(config: ServiceConfig) -> dict[str, int]:
    """The worker actor's thread groups beside its ``CONTROL_THREADS``: answers, the router's polls, and its start's
    state."""
    return {ANSWER_GROUP: config.answer_threads, TELEMETRY_GROUP: TELEMETRY_THREADS, START_GROUP: START_THREADS}


def worker_actor(config: ServiceConfig):
    """The Ray actor class of a worker, with its resources, restarts and thread count."""
    import ray

    return ray.remote(concurrency_groups=worker_concurrency_groups(config))(WorkerCore).options(
        num_cpus=config.worker_cpus,
        num_gpus=config.worker_gpus,
        max_restarts=MAX_RESTARTS,
        max_task_retries=0,
        max_concurrency=CONTROL_THREADS,
    )

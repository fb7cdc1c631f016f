"""Service settings, validated at the edge: defaults < environment (``MOSAIC_API_KEY``, ``MOSAIC_REDIS_URL``, for
what the file leaves unset) < ``--config`` YAML < command-line flags.

The YAML file uses the ``mosaic serve`` option names with underscores at the top level; a nested ``engine:``
mapping passes further ``EngineConfig`` fields through (``target_tokens_per_frame``, ``eviction_policy``,
...; ``formation:`` is a nested ``FormationConfig`` mapping whose ``max_tokens`` defaults to a quarter of
the retrieval budget)::

    model: tiny
    workers: 2
    device_budget_bytes: 268435456
    engine:
      target_tokens_per_frame: 64

The core takes frozen dataclasses; only this module knows pydantic.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mosaic_core.bookkeeping.formation_config import FormationConfig
from mosaic_core.config import MIB, EngineConfig
from mosaic_core.errors import ConfigError
from mosaic_core.model.geometry import model_pixels
from services.metadata.schema import DEFAULT_TIMEOUT_S
from services.source_hosts import DEFAULT_BLOCKED_NETWORKS, parse_networks

API_KEY_ENV = "MOSAIC_API_KEY"
# Flags whose value may also come from the environment when neither the flag nor the file sets them.
_ENV_FIELDS = {"api_key": API_KEY_ENV, "redis_url": "MOSAIC_REDIS_URL"}


class ServiceConfig(BaseModel):
    """Everything ``mosaic serve`` needs. Sizes are bytes, times seconds.

    Engine-facing fields (mode, budgets, tokens) are turned into an ``EngineConfig`` by ``engine_config``; the
    defaults suit the ``tiny`` preset on a CPU, a real deployment sets them in its YAML file.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # --- network ---
    # Loopback unless an operator names an address: nothing listens beyond this machine by default (the image and the
    # chart pass 0.0.0.0).
    host: str = "127.0.0.1"
    grpc_port: int = Field(50051, ge=0, le=65535)
    metrics_port: int = Field(9464, ge=0, le=65535)
    api_key: str | None = Field(None, repr=False)  # never in the config's text (a log line, a traceback)
    # A file of API keys, one a line, read again when it changes (services.api_keys): keys rotate without a restart.
    # Instead of api_key (and MOSAIC_API_KEY, which is then ignored).
    api_key_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    max_message_bytes: int = Field(16 * MIB, ge=1024)
    # The router sends a keepalive ping to a client connection with calls open at most every grpc_keepalive_s, and
    # closes it (ending its calls) when a ping is not answered within grpc_keepalive_timeout_s: a client gone without
    # closing its connection frees its WatchEvents subscriber place and its questions within about 80 s, not hours.
    grpc_keepalive_s: float = Field(60.0, gt=0)
    grpc_keepalive_timeout_s: float = Field(20.0, gt=0)
    # The operator console (docs/console.md): a web page on this port of ``host``, off unless asked for.
    console: bool = False
    console_port: int = Field(8080, ge=0, le=65535)
    # --- cluster ---
    ray_address: str = "local"
    ray_num_cpus: float | None = Field(None, gt=0)
    ray_log_to_driver: bool = True
    # Ray's dashboard (and its job API) stays off unless asked for; then it listens on loopback only.
    ray_dashboard: bool = False
    redis_url: str | None = None
    redis_namespace: str = "mosaic"
    # Seconds each Redis client of the router and the workers waits to connect and for each reply. A Redis that stops
    # answering (frozen, or cut off without a reset) then fails a call with UNAVAILABLE after about this long, and
    # frees its thread, instead of holding it for the whole outage.
    redis_timeout_s: float = Field(DEFAULT_TIMEOUT_S, gt=0)
    workers: int = Field(1, ge=1, le=1024)
    worker_gpus: float = Field(0.0, ge=0)
    worker_cpus: float = Field(0.5, gt=0)
    worker_start_timeout_s: float = Field(180.0, gt=0)
    # --- engine ---
    model: str = "tiny"
    mode: Literal["full", "token", "frame", "cluster"] = "cluster"
    device_budget_bytes: int = Field(256 * MIB, gt=0)
    # On a GPU: the device budget becomes this share of the GPU memory free once the model is loaded, less 4.5 GiB
    # (2 GiB with the engine's tower_stream off; mosaic_core.config.device_budget_from_free), where that is more than
    # device_budget_bytes. None: the budget is device_budget_bytes. History the device budget cannot hold is spilled
    # to the host: at 192 cameras on the H200 (20 s kept per camera) the history took 35.5 GiB, more than a 32-GiB
    # budget (bench/NOTES.md, session 27).
    device_budget_share: float | None = Field(None, gt=0, lt=1)
    host_budget_bytes: int = Field(1024 * MIB, ge=0)
    # Camera history (sealed clusters, stream records) is kept here, one folder per worker, and survives
    # restarts; None keeps it in a temporary folder for the server's lifetime (it survives worker restarts only).
    data_dir: str | None = None
    # Bytes of sealed clusters' records each worker keeps under data_dir; past it the clusters sealed first, across its
    # streams, are dropped as retention drops them (mosaic_durable_clusters_dropped_for_space_total). 0: no limit.
    history_budget_bytes: int = Field(0, ge=0)
    disk_dir: str | None = None
    disk_budget_bytes: int = Field(0, ge=0)
    # --- sources ---
    # URL schemes a stream's source_url may use (services.source_policy.SUPPORTED_SOURCE_SCHEMES lists the choices).
    allowed_source_schemes: list[str] = Field(default_factory=lambda: ["rtsp", "rtsps", "http", "https"])
    # Local video files are accepted only under these folders; none by default.
    source_roots: list[str] = Field(default_factory=list)
    # Networks (CIDR) a source URL's host may not be in, as written or as resolved before each connect
    # (services.source_hosts): by default loopback and link-local, where cloud metadata services answer. [] opens all.
    source_blocked_networks: list[str] = Field(default_factory=lambda: list(DEFAULT_BLOCKED_NETWORKS))
    engine: dict[str, Any] = Field(default_factory=dict)
    # --- scheduling ---
    query_queue_size: int = Field(64, ge=1)
    query_concurrency: int = Field(4, ge=1)
    # Each worker's threads for answers, one per stream a running question asks about (a question over every camera
    # asks each of them); an answer beyond them waits for one in the worker's queue, within its deadline. The
    # worker's other calls (frames, telemetry, cancels) have threads of their own.
    answer_threads: int = Field(64, ge=1)
    default_max_new_tokens: int = Field(32, ge=1)
    ingest_queue_frames: int = Field(32, ge=1)
    # Frames of one engine.ingest call, one from each of up to this many streams, those longest behind first; a GPU
    # ingests more frames per second in larger calls (bench/NOTES.md, issue 15), which cost activation memory, and
    # question latency only when ingest_pause_layers is 0. 128, what every GPU figure of the service used: with 64,
    # 150 cameras on an H100 fell behind (127 frames/s against 156 with 128, bench/NOTES.md, session 40).
    max_batch_frames: int = Field(128, ge=1)
    # Streams the router takes per worker (the server's limit is this times workers); CreateStream beyond is
    # RESOURCE_EXHAUSTED. Each stream takes room in its worker's device budget, a queue of frames and, when pulled, a
    # decoding child process (about 55 MB), so one client creating streams without end would take every worker down
    # with it. Twice the most cameras one worker was run with in the service benchmark (256, bench/NOTES.md).
    max_streams_per_worker: int = Field(512, ge=1)
    max_push_calls: int = Field(64, ge=1)
    # Calls of every method held open at once, the health check apart (services.call_limit): a bound over the
    # per-method ones (max_push_calls, max_watch_subscribers, the question queue) that also covers the health Watch
    # and reflection streams, which need no API key.
    max_open_calls: int = Field(2048, ge=1)
    # Of those, the calls one client may hold open, and its PushFrames calls (of max_push_calls), so that one client
    # cannot lock the others out (services.call_limit). A client is an API key where keys are checked, else a host:
    # clients that share a key, or reach the router through one proxy without keys, share these places. None: no cap
    # of a client's own, only the server's, since a deployment's one backend is often its only client. At most the
    # server's limit.
    max_open_calls_per_client: int | None = Field(None, ge=1)
    max_push_calls_per_client: int | None = Field(None, ge=1)
    # A PushFrames call that sends no frame for this long ends (DEADLINE_EXCEEDED), so that calls a client left open,
    # or whose client died with its connection left half-open, do not hold the max_push_calls places from every other
    # camera. A camera that pushes less often than this opens a call per frame, or per few.
    push_idle_timeout_s: float = Field(60.0, gt=0)
    max_stream_fps: float = Field(60.0, gt=0)
    # Share of a worker's measured ingest rate that its streams' fps may add up to; 0 admits every stream.
    ingest_headroom: float = Field(0.8, ge=0, le=1)
    # Questions one stream may have running or waiting; past it, RESOURCE_EXHAUSTED with a retry hint.
    max_questions_per_stream: int = Field(4, ge=1)
    # How long running answers may keep decoding between ingest calls while frames wait (0: a token per call).
    answer_slice_s: float = Field(0.25, ge=0)
    # An ingest call pauses for new questions after the vision tower, before every this many layers of a forward
    # pass and at its end, before its upkeep (0: never), so a question's first token waits for one such chunk, not for
    # the whole call; ingest_pause_frames > 0 also cuts the tower into chunks of that many frames (at 64 cameras on the
    # H200, 32-frame chunks left the service behind real time: bench/NOTES.md, session 12). ingest_pause_blocks > 0
    # pauses inside the tower too, before every this many of its blocks, each of which runs over all of the call's
    # frames at once (0: no pause inside the tower; needs ingest_pause_layers > 0). ingest_pause_placed > 0 pauses
    # after every this many frames placed into clusters once a pass's language model is queued, without waiting for
    # the device there (0: none). The defaults (layers 4, blocks 4, placed 16, lookahead 1) are the one setting of
    # five measured at 150 cameras on one H200 that ingested the most (bench/NOTES.md, session 23): 169.2 frames/s
    # with a backlog, TTFT p50/p99 88/541 ms. With placed 16 against none (blocks 4, layers 4, lookahead 2,
    # consecutive calls) the service ingested 164.1 frames/s against 150.7, TTFT p50/p99 132/202 ms against 147/273.
    # Layers 2 made the engine's prefill to first token shortest (34/45 ms) but ingested less: 142.6 frames/s in a
    # ramp where 150 cameras fell behind (156.1 in a run on its own, lag p99 2.9 s). In every setting the TTFT p99
    # came from a few questions that waited for a stretch without a pause: at the start of an ingest call, or
    # between two pauses.
    ingest_pause_layers: int = Field(4, ge=0)
    ingest_pause_frames: int = Field(0, ge=0)
    ingest_pause_blocks: int = Field(4, ge=0)
    ingest_pause_placed: int = Field(16, ge=0)
    # At a pause the host waits until the device is at most this many chunks of work (the work between two pauses)
    # behind it: more lets the host place a pass's frames while the device still runs its language model, and makes a
    # question started at a pause wait for more ingest work. At 150 cameras on the H200 (placed 16, blocks 4), 1
    # ingested 169.2 frames/s against 2's 164.1 with TTFT p50 88 ms against 132, in two calls on two machines
    # (bench/NOTES.md, session 23).
    ingest_pause_lookahead: int = Field(1, ge=1)
    # A pause where no question waits to start is passed without waiting for the device, so a call that no question
    # arrives in runs as without pauses, the host placing a pass's frames while the device runs its language model; a
    # question that arrives then waits at the next pause for the device to catch up. Off by default: at 128 cameras on
    # the H200 the service's engine thread took 6.0 ms a frame either way, and TTFT p50 rose from about 135 ms to
    # about 220 (bench/NOTES.md, session 17).
    ingest_pause_skip_idle: bool = False
    # The vision tower's attention kernel on CUDA: "flash" holds it to FlashAttention, "auto" lets PyTorch pick per
    # call, which on the H200 paid 54-85 ms more on the first call of each new batch size (an ingest call's size
    # changes with the frames waiting) at the same speed per call (mosaic_core.model.vision_attention).
    # "varlen" (the default) also sends a frame's windows of several lengths to one variable-length Flash call a
    # block: at 150 cameras on the H200 (reached from 128; two runs on two machines) the engine thread's stretches
    # without a chance to start a question were 0.007 s a second against 0.035 with "flash", and TTFT p99 166 ms
    # against 261 (bench/NOTES.md, session 26). It needs torch.nn.attention.varlen (the torch the README installs has
    # it); an older torch must choose "flash".
    vision_attention: Literal["flash", "auto", "varlen"] = "varlen"
    # On a GPU, questions started at those pauses run on a high-priority CUDA stream beside the ingest work already
    # queued, and the host does not wait for the device at pauses (mosaic_core.engine.ingest_pauses); false: the
    # host waits at each pause until the device is ingest_pause_lookahead chunks behind, and the questions run behind
    # those chunks. Off by default: at 128 cameras on the H200 the service ingested 92 frames/s with it, against 123
    # without, though on two machines (bench/NOTES.md, session 15); in session 26, at 128 and 150 cameras, its TTFT p99
    # was 452 and 423 ms, its prefill p99 355 and 300 ms.
    questions_alongside_ingest: bool = False
    # As an ingest call returns, a GPU worker takes the next call's frames and queues their vision tower before the
    # questions and upkeep that follow the call (services.ingest_calls). It needs the engine's tower_stream (on by
    # default here; `engine: {tower_stream: false}` turns it off), on which that tower runs beside the language model
    # just queued; without it the worker turns encode_ahead off with a warning. A CPU worker leaves it off: there the
    # tower would only run before the questions, beside nothing. It needs ingest_queue_frames above the engine's
    # max_frames_per_pass (a worker refuses to start otherwise). On by default: at 150 cameras on an H100 the service
    # ingested 139.8 frames/s with both against 80.9 without, and 157.7 against 127.1 in a second run, with a lower
    # TTFT p99 (330 against 705 ms, 262 against 404); not yet measured on an H200 (bench/NOTES.md, sessions 36, 38).
    encode_ahead: bool = True
    # The worker process's sys.setswitchinterval: how long one Python thread may keep the GIL once another asks for
    # it. The engine thread, which queues the GPU's work, needs the GIL nearly all the time. On the H200 at 150
    # cameras, 1 ms gave a server TTFT p50 of 37 ms against 89 at Python's 5 ms (two runs on two machines); but a
    # ramp with 1 ms (and the tower's varlen attention) ingested 110, 69 and 74 frames/s at 150, 192 and 256 cameras,
    # where session 25's ramp at 5 ms held 142-148, so 5 ms stays the default until the two are measured side by
    # side (bench/NOTES.md, session 26).
    python_switch_interval_s: float = Field(0.005, gt=0, le=0.1)
    # A worker freezes the objects it holds once its engine is warmed up, before it restores or opens any stream, out
    # of garbage collection (services.gc_watch): with the 7B model on the H200 host a full collection over them took
    # 431 ms with the GIL held, under 1 ms after (bench/NOTES.md, session 25). False: CPython's collections as they
    # come.
    freeze_heap_after_start: bool = True
    # Each pulled source is decoded in a child process of its own (services.source_decoding), so decoding does not
    # take the worker's GIL from its engine thread; a child takes about 55 MB of memory (RSS, on this machine). False: a
    # thread of the worker decodes it.
    decode_sources_in_processes: bool = True
    # A frame from a pulled source or a PushFrames call with more pixels than decode_oversample squared times those of
    # the frame the model takes (target_tokens_per_frame tokens of 28x28 pixels: 401,408 pixels at 128 tokens and 2)
    # is scaled down to that many as it is decoded, aspect ratio kept, so that a camera's 1080p or 4K pictures do not
    # cross the decoder's pipe, Ray and the engine thread's upload at full size; the model's own resize still reads
    # about decode_oversample times the width and height it keeps. 0: every frame keeps its size.
    decode_oversample: float = Field(2.0, ge=0)
    # Threads of the router that decode pushed JPEG/PNG frames (and scale pushed frames down), apart from the event
    # loop's default threads, on which the watch store's reads and webhook posts run: sharing those, 48 PushFrames
    # calls of 1080p JPEGs made a ListWatches call's store read wait 0.35-0.45 s (p50) for a thread on a 2-core
    # machine, under 1 ms with threads of their own; and reads a hung Redis held kept every pushed frame from being
    # decoded. A PushFrames call decodes one frame at a time, so at most max_push_calls frames wait for these threads.
    # Default: os.cpu_count(), at most 8.
    decode_threads: int = Field(default_factory=lambda: min(8, os.cpu_count() or 1), ge=1)
    # A source goes to ERROR after this many failed connections in a row (a live camera is then tried every 30 s),
    # or refused frames in a row.
    source_max_failures: int = Field(10, ge=1)
    source_max_refused_frames: int = Field(100, ge=1)
    # A pushed frame may run at most this far ahead of its stream's clock (real time since the first frame, or
    # Unix time, but never behind the newest frame); one wild timestamp would otherwise freeze the camera.
    max_push_skew_s: float = Field(120.0, gt=0)
    metadata_queue_size: int = Field(10_000, ge=1)
    metadata_resync_interval_s: float = Field(5.0, gt=0)
    max_stream_labels: int = Field(64, ge=0)
    telemetry_interval_s: float = Field(1.0, gt=0)
    # --- standing questions (docs/watches.md) ---
    max_watches: int = Field(1000, ge=0)
    # Events kept per watch for subscribers that reconnect; older ones are dropped (counted).
    watch_event_buffer: int = Field(1000, ge=1)
    max_watch_subscribers: int = Field(256, ge=1)
    # Lift (nats) and cooldown a watch gets when CreateWatch leaves them unset.
    watch_default_threshold: float = 1.0
    watch_default_cooldown_s: float = Field(60.0, ge=0)
    # Per worker: watch answers waiting for an idle engine, and fired events waiting for the router.
    watch_answer_queue_size: int = Field(64, ge=1)
    # Watch answers a worker runs at once (each on its own camera), only while no question runs or waits.
    watch_answer_concurrency: int = Field(1, ge=1)
    watch_outbox_size: int = Field(1000, ge=1)
    # An event whose answer has not run within this long fires without one (answer_error says why).
    watch_answer_timeout_s: float = Field(30.0, gt=0)
    # Seconds of neighbouring history a watch's answer may read on each side of the sealed cluster.
    watch_answer_context_s: float = Field(0.0, ge=0)
    # Per worker, on its device: cached question queries of (stream, watch question) pairs, least recently used
    # dropped first (about 1 MiB a pair at the 7B shape); a dropped pair is prefilled again when next needed.
    watch_query_cache_bytes: int = Field(1 << 30, ge=0)
    # Webhook targets a watch may name: URL prefixes (scheme, host, port, path prefix). Empty: webhooks are off.
    webhook_allowed_urls: list[str] = Field(default_factory=list)
    webhook_timeout_s: float = Field(5.0, gt=0)
    webhook_max_attempts: int = Field(4, ge=1, le=20)
    webhook_queue_size: int = Field(1000, ge=1)
    shutdown_grace_s: float = Field(5.0, ge=0)
    shutdown_drain_s: float = Field(1.0, ge=0)

    @model_validator(mode="after")
    def _check_pairs(self) -> ServiceConfig:
        from services.source_policy import check_source_schemes  # raises ConfigError naming an unsupported scheme

        check_source_schemes(self.allowed_source_schemes)
        parse_networks(self.source_blocked_networks)  # raises ConfigError naming one that is not a network
        from services.api_keys import check_key, read_key_file  # raise naming the setting, or the file's bad line

        if self.api_key is not None:
            check_key(self.api_key, f"api_key (or {API_KEY_ENV})")
        if self.api_key_file is not None:
            if self.api_key is not None:
                raise ValueError(
                    "api_key and api_key_file both set; give one (a file's keys can change without a restart)"
                )
            read_key_file(self.api_key_file)
        for per_client, server in (
            ("max_open_calls_per_client", "max_open_calls"),
            ("max_push_calls_per_client", "max_push_calls"),
        ):
            if (getattr(self, per_client) or 0) > getattr(self, server):
                raise ValueError(
                    f"{per_client}={getattr(self, per_client)} is more than {server}={getattr(self, server)}, the "
                    "server's limit for every client together; set it lower, or leave it unset"
                )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError(
                f"tls_cert and tls_key go together, got tls_cert={self.tls_cert!r}, tls_key={self.tls_key!r}"
            )
        from services.watches_webhook import check_allowed_prefixes  # raises ConfigError naming a bad prefix

        check_allowed_prefixes(self.webhook_allowed_urls)
        if self.disk_budget_bytes > 0 and not self.disk_dir:
            raise ValueError(f"disk_budget_bytes={self.disk_budget_bytes} needs disk_dir")
        return self

    def decode_max_pixels(self) -> int | None:
        """The most pixels a decoded frame keeps (``decode_oversample``); None: no cap."""
        if self.decode_oversample == 0:
            return None
        return round(self.decode_oversample**2 * model_pixels(self.engine_config().target_tokens_per_frame))

    def engine_config(self, *, worker_subdir: str | None = None) -> EngineConfig:
        """The worker's ``EngineConfig``; ``worker_subdir`` gives each worker its own disk-tier and data folder. The
        closed streams' next numbers stay in the data folder itself, which workers on one machine or one shared
        volume share: a stream deleted on one worker may be created again on another, which must number on past
        it."""
        disk_dir, data_dir = self.disk_dir, self.data_dir
        if worker_subdir:
            disk_dir = disk_dir and str(Path(disk_dir) / worker_subdir)
            data_dir = data_dir and str(Path(data_dir) / worker_subdir)
        fields: dict[str, Any] = {
            "target_tokens_per_frame": 64,
            "local_window_tokens": 256,
            "retrieval_budget_tokens": 512,
            "tower_stream": True,  # on a GPU only; with encode_ahead (above)
            **self.engine,
            "mode": self.mode,
            "device_budget_bytes": self.device_budget_bytes,
            "host_budget_bytes": self.host_budget_bytes,
            "disk_budget_bytes": self.disk_budget_bytes,
            "history_budget_bytes": self.history_budget_bytes,
            "disk_dir": disk_dir,
            "data_dir": data_dir,
            "retired_ids_dir": self.data_dir,
        }
        formation = fields.get("formation") or {}
        if isinstance(formation, dict):
            # A cluster must fit in one retrieval, and several should: a quarter of the budget by default,
            # but never below two frames (a frame larger than the cap is refused).
            budget, per_frame = int(fields["retrieval_budget_tokens"]), int(fields["target_tokens_per_frame"])
            cap = min(budget, max(budget // 4, 2 * per_frame))
            formation = {"max_tokens": cap, **formation}
            fields["formation"] = FormationConfig(**formation)
        try:
            return EngineConfig(**fields)
        except TypeError as err:
            raise ConfigError(
                f"unknown engine setting in `engine:` ({err}); see mosaic_core.config.EngineConfig"
            ) from err


def load_config(path: str | os.PathLike | None = None, **overrides: Any) -> ServiceConfig:
    """Builds the config from an optional YAML file, the environment and explicit overrides.

    Args:
        path: YAML file with ``ServiceConfig`` fields; ``None`` for defaults only.
        **overrides: values that win over the file (command-line flags); ``None`` values are ignored.

    Raises:
        ConfigError: unreadable file, unknown key, or a value out of range (the message names it).
    """
    values: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"cannot read config file {str(path)!r}: {err}") from err
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping, got {type(loaded).__name__}")
        values.update({str(k).replace("-", "_"): v for k, v in loaded.items()})
    for name, env in _ENV_FIELDS.items():
        if name == "api_key" and (overrides.get("api_key_file") or values.get("api_key_file")):
            continue  # the key file stands in for the key, wherever that would come from
        if values.get(name) is None and os.environ.get(env):
            values[name] = os.environ[env]
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return ServiceConfig(**values)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise ConfigError(f"invalid service config: {problems}") from None

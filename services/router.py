"""The router process: gRPC server (asyncio), health, reflection, auth, TLS, metrics, workers, shutdown.

Start-up order, chosen so probes always get an answer:

1. metrics HTTP endpoint (every family primed, so the first scrape lists them all);
2. gRPC server with health ``""`` SERVING (the process is alive) and ``mosaic.v1.Mosaic`` NOT_SERVING;
3. Ray, the metadata store (Redis, or the in-memory store actor) and the worker actors, which take
   seconds to minutes to build their engines (``mosaic_workers_starting`` counts them meanwhile, from the first
   scrape, and ``mosaic_workers_up`` once they answered);
4. ``mosaic.v1.Mosaic`` flips to SERVING once every worker answered; afterwards it follows the telemetry
   poll: NOT_SERVING while no worker answers (no one could take a question), SERVING again when one does.

Shutdown (SIGINT/SIGTERM or ``stop``): every health service goes NOT_SERVING first, new calls are
refused, running ones get ``shutdown_grace_s``, then the workers make their streams durable, all at once, for what
is left of the pod's grace (``GRACE_PAST_CALLS_S`` past ``shutdown_grace_s``, as the Helm chart sets it), each handing
back its last telemetry (the frames it ingested or dropped as it stopped) for the metrics, and the workers, the store
actor and Ray are stopped.

Authentication: ``services.auth``. Calls open at once are bounded: ``services.call_limit``.

Ray is started (or joined) with ``services.ray_setup.init_ray``, which binds a local cluster to loopback when
the host is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import tempfile
import time
from pathlib import Path

import grpc
import ray
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from services import gil_probe, heap_probe
from services.api_keys import ApiKeys
from services.auth import ApiKeyInterceptor, clear_text_key_warning
from services.call_limit import CallLimitInterceptor
from services.config import ServiceConfig
from services.console.server import ConsoleServer
from services.coordinator import Coordinator
from services.gen.mosaic.v1 import mosaic_pb2, mosaic_pb2_grpc
from services.metadata.watches import InMemoryWatchStore, RedisWatchStore
from services.metrics import MosaicMetrics
from services.ray_setup import init_ray
from services.request_log import RequestLogInterceptor
from services.scheduler import QueryQueue
from services.servicer import MosaicServicer
from services.source_policy import SourcePolicy
from services.store_actor import RayMetadataStore, connect_store
from services.url_text import host_in_address
from services.watches import WatchRegistry
from services.worker_actor import worker_actor

log = logging.getLogger(__name__)
SERVICE_NAME = mosaic_pb2.DESCRIPTOR.services_by_name["Mosaic"].full_name
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
# The Helm chart sets shutdown_grace_s to the pod's terminationGracePeriodSeconds less this: the time past the calls'
# grace, from SIGTERM on, that the router has before the kubelet's SIGKILL to stop its workers, its stores and Ray.
GRACE_PAST_CALLS_S = 20.0
# Of that time, what is kept for the steps after the workers' shutdown (their kill, the stores, ray.shutdown).
AFTER_WORKERS_S = 4.0
# A worker's shutdown gets at least this long, even when the draining calls used up the pod's grace.
MIN_WORKER_STOP_S = 1.0


class MosaicServer:
    """One router: call ``start``, then ``wait`` or ``stop``.

    Args:
        config: service settings; ports 0 pick free ports (see ``grpc_port``/``metrics_port`` after start).
    """

    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self.metrics = MosaicMetrics(max_stream_labels=config.max_stream_labels)
        # From the first scrape until the coordinator has heard from them (or given up): not up, and not down either.
        self.metrics.set_workers_starting(config.workers)
        self.health = health.aio.HealthServicer()
        self.grpc_port = 0
        self.metrics_port = 0
        self.console_port = 0  # 0 while the console is off
        self.coordinator: Coordinator | None = None
        self._server: grpc.aio.Server | None = None
        self._metrics_server = None
        self._console: ConsoleServer | None = None
        self._workers: list = []
        self._store_actor = None
        self._started_ray = False
        self._temp_data_dir: str | None = None
        self._telemetry_task: asyncio.Task | None = None
        self.servicer: MosaicServicer | None = None
        self.watches: WatchRegistry | None = None
        self._stopped = asyncio.Event()
        self._ready = False  # what mosaic.v1.Mosaic's health says

    async def start(self) -> None:
        cfg = self.config
        self.metrics.prime(tuple(str(i) for i in range(cfg.workers)))
        self._metrics_server = self.metrics.start_http_server(cfg.metrics_port, addr=cfg.host)
        self.metrics_port = self._metrics_server.port
        queue = QueryQueue(
            max_waiting=cfg.query_queue_size,
            max_running=cfg.query_concurrency,
            on_depth=self.metrics.set_query_queue_depth,
            on_running=self.metrics.set_queries_running,
        )
        # Ray first: it forks its daemons, which is noisy (and unsafe) once gRPC threads are running.
        self.start_ray()
        await self._start_grpc(queue)
        try:
            if self._console is not None:  # up before the workers: until then its calls answer as gRPC's do
                await self._console.start()
                self.console_port = self._console.port
            await self._start_backend()
        except BaseException:
            await self.stop()
            raise
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        self._ready = True
        self._telemetry_task = asyncio.create_task(self._telemetry_loop())
        log.info("mosaic serving gRPC on %s:%d, metrics on :%d", cfg.host, self.grpc_port, self.metrics_port)

    async def _start_grpc(self, queue: QueryQueue) -> None:
        cfg = self.config
        self._server = grpc.aio.server(interceptors=interceptors(cfg, self.metrics), options=grpc_server_options(cfg))
        # Handlers must be registered before start; until the workers are up the coordinator has none, so
        # calls fail with NOT_FOUND/UNAVAILABLE while readiness reports NOT_SERVING.
        self.coordinator = Coordinator([], None, self.metrics)
        servicer = MosaicServicer(
            self.coordinator,
            queue,
            self.metrics,
            mode=cfg.mode,
            default_max_new_tokens=cfg.default_max_new_tokens,
            max_new_tokens_limit=cfg.engine_config().max_new_tokens_limit,  # the workers' own: one source, no drift
            max_push_calls=cfg.max_push_calls,
            push_idle_timeout_s=cfg.push_idle_timeout_s,
            max_streams=cfg.max_streams_per_worker * cfg.workers,
            max_fps=cfg.max_stream_fps,
            source_policy=SourcePolicy.of(cfg),
            decode_max_pixels=cfg.decode_max_pixels(),
            max_reply_bytes=cfg.max_message_bytes,
            decode_threads=cfg.decode_threads,
        )
        servicer.watch_defaults = (cfg.watch_default_threshold, cfg.watch_default_cooldown_s)
        self.servicer = servicer
        mosaic_pb2_grpc.add_MosaicServicer_to_server(servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        _enable_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME, REFLECTION_V1), self._server)
        address = f"{host_in_address(cfg.host)}:{cfg.grpc_port}"
        if cfg.tls_cert:
            creds = grpc.ssl_server_credentials([(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())])
            self.grpc_port = self._server.add_secure_port(address, creds)
        else:
            self.grpc_port = self._server.add_insecure_port(address)
            if warning := clear_text_key_warning(cfg):
                log.warning(warning)
        if cfg.console:
            self._console = ConsoleServer(cfg)
            self._console.bind_grpc(self._server)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._server.start()

    def start_ray(self) -> None:
        """Initialises Ray unless this process already did (blocking; idempotent)."""
        if ray.is_initialized():
            return  # an embedding process (tests, notebooks) or an earlier call owns Ray
        init_ray(self.config, log_to_driver=self.config.ray_log_to_driver)
        self._started_ray = True

    async def _start_backend(self) -> None:
        if self.config.data_dir is None:
            # No --data-dir: history lives in a folder of this server's own, so it survives worker restarts
            # (Ray re-creates a dead worker with the same config) but not the server.
            self._temp_data_dir = tempfile.mkdtemp(prefix="mosaic-data-")
            self.config = self.config.model_copy(update={"data_dir": self._temp_data_dir})
            log.warning(
                "no --data-dir: camera history is kept in %s and deleted when the server stops", self._temp_data_dir
            )
        cfg = self.config
        if cfg.redis_url:
            worker_store = None  # each worker connects to Redis itself
            store = await asyncio.to_thread(
                connect_store, cfg.redis_url, namespace=cfg.redis_namespace, timeout_s=cfg.redis_timeout_s
            )
        else:
            store = RayMetadataStore.start()
            self._store_actor, worker_store = store.actor, store  # pickles as the actor's name
        self.coordinator.store = store
        self.coordinator.data_dir = cfg.data_dir
        actor_cls = worker_actor(cfg)
        self._workers = [actor_cls.remote(str(i), worker_config(cfg), worker_store) for i in range(cfg.workers)]
        self.coordinator.workers = self._workers
        await self.coordinator.start(cfg.worker_start_timeout_s)
        if cfg.redis_url:
            watch_store = await asyncio.to_thread(
                RedisWatchStore.from_url, cfg.redis_url, namespace=cfg.redis_namespace, timeout_s=cfg.redis_timeout_s
            )
        else:
            watch_store = InMemoryWatchStore()  # watches last as long as this router (docs/watches.md)
        self.watches = WatchRegistry(watch_store, self.coordinator, self.metrics, cfg)
        await self.watches.start()
        self.servicer.watches = self.watches

    async def _telemetry_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.telemetry_interval_s)
            try:
                await self.coordinator.poll_telemetry()
            except Exception:
                log.exception("telemetry poll failed")
            await self._set_readiness()

    def _num_ready_workers(self) -> int:
        """Workers that answered the last telemetry poll with an engine thread that moves (the coordinator's view)."""
        return len(self.coordinator.ready_workers)

    async def _set_readiness(self) -> None:
        """``mosaic.v1.Mosaic`` is SERVING only while some worker can take questions; never during shutdown."""
        if self._stopped.is_set():
            return
        ready = self._num_ready_workers() > 0
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        if ready != self._ready:
            log.warning(
                "readiness: %s (%d workers ready)", "SERVING" if ready else "NOT_SERVING", self._num_ready_workers()
            )
            self._ready = ready
        await self.health.set(SERVICE_NAME, status)

    async def stop(self, grace_s: float | None = None) -> None:
        """Flips health to NOT_SERVING, drains calls for ``grace_s``, then stops workers and Ray."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        stopping_s = time.monotonic()  # about when the kubelet sent SIGTERM: its SIGKILL counts from then
        self.metrics.set_workers_starting(0)  # a start-up that failed before the coordinator waited waits no more
        await self.health.enter_graceful_shutdown()
        # Let load balancers and readiness probes see NOT_SERVING before new calls are refused.
        await asyncio.sleep(self.config.shutdown_drain_s)
        if self._telemetry_task is not None:
            self._telemetry_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._telemetry_task
        if self.watches is not None:
            await self.watches.stop_polls()  # the events a poll has taken are stored first
            await self.watches.end_subscribers()  # else their calls hold the server's stop for its whole grace
        if self._console is not None:
            await self._console.stop()  # ends the page's event streams before the calls they relay
        calls_grace_s = self.config.shutdown_grace_s if grace_s is None else grace_s
        if self._server is not None:
            await self._server.stop(calls_grace_s)
        if self.servicer is not None:
            self.servicer.close()  # after the calls, whose frames it decodes
        workers_until_s = stopping_s + calls_grace_s + GRACE_PAST_CALLS_S - AFTER_WORKERS_S
        stops = [self._stop_worker(index, worker, workers_until_s) for index, worker in enumerate(self._workers)]
        for index, result in enumerate(await asyncio.gather(*stops, return_exceptions=True)):
            if isinstance(result, Exception):
                log.error("stopping worker %d failed: %s", index, result)
        if self.watches is not None:
            await self.watches.close()
        if self._store_actor is not None:
            ray.kill(self._store_actor, no_restart=True)
        if self.coordinator is not None and self.coordinator.store is not None:
            self.coordinator.store.close()
        if self.watches is not None:
            self.watches.store.close()
        if self._metrics_server is not None:
            self._metrics_server.close()
        if self._started_ray:
            ray.shutdown()
        if self._temp_data_dir is not None:
            shutil.rmtree(self._temp_data_dir, ignore_errors=True)

    async def _stop_worker(self, index: int, worker, until_s: float) -> None:
        """Lets one worker make its streams durable until ``until_s`` (monotonic), takes its last telemetry (the
        frames its shutdown ingested or dropped), then kills it. Workers stop side by side: one after another, with
        many cameras on a slow volume, the later ones were killed by the pod's SIGKILL mid-flush."""
        timeout_s = max(MIN_WORKER_STOP_S, until_s - time.monotonic())
        try:
            last = await asyncio.wait_for(worker.shutdown.remote(), timeout_s)
        except TimeoutError:  # no time is left to take its watch events either
            log.error(
                "worker %d did not finish its shutdown in %.1fs (the pod's grace left it no more); it is killed, and "
                "what it had not made durable is lost", index, timeout_s,
            )  # fmt: skip
            ray.kill(worker, no_restart=True)
            return
        except Exception as err:
            log.error("worker %d's shutdown failed: %s", index, err)
        else:
            if last is not None and self.coordinator is not None:
                self.coordinator.take_last_telemetry(index, last)
        if self.watches is not None:
            await self.watches.drain(index)  # events whose answers the shutdown cut short
        ray.kill(worker, no_restart=True)

    async def wait(self) -> None:
        await self._stopped.wait()


def interceptors(cfg: ServiceConfig, metrics: MosaicMetrics) -> list[grpc.aio.ServerInterceptor]:
    """The router's interceptors, outermost first: the request log (refused calls are logged too), the API key check
    where keys are set, then the call limits, so that a call without a valid key takes no place and does not learn
    how busy the server is."""
    by_api_key = bool(cfg.api_key or cfg.api_key_file)
    chain: list[grpc.aio.ServerInterceptor] = [RequestLogInterceptor()]
    if by_api_key:
        keys = ApiKeys(key=cfg.api_key) if cfg.api_key else ApiKeys(path=cfg.api_key_file)
        chain.append(ApiKeyInterceptor(keys, metrics))
    chain.append(
        CallLimitInterceptor(
            cfg.max_open_calls,
            metrics,
            max_open_calls_per_client=cfg.max_open_calls_per_client,
            max_push_calls_per_client=cfg.max_push_calls_per_client,
            by_api_key=by_api_key,
        )
    )
    return chain


def grpc_server_options(cfg: ServiceConfig) -> list[tuple[str, int]]:
    """The gRPC server's channel arguments: message limits, and keepalive pings that find a client gone without
    closing its connection (a node lost, a NAT that forgot it), whose calls would otherwise hold their places
    (WatchEvents subscribers, questions) until gRPC's default first ping, two hours in."""
    return [
        ("grpc.max_send_message_length", cfg.max_message_bytes),
        ("grpc.max_receive_message_length", cfg.max_message_bytes),
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_time_ms", round(cfg.grpc_keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", round(cfg.grpc_keepalive_timeout_s * 1000)),
        # How long the installed gRPC (1.85) waits for a ping's answer before it closes the connection: with
        # keepalive_timeout_ms alone, a connection whose ping went unanswered stayed open, its calls with it, for the
        # 12 s watched (tests/integration/test_gone_clients.py's set-up).
        ("grpc.http2.ping_timeout_ms", round(cfg.grpc_keepalive_timeout_s * 1000)),
    ]


def worker_config(cfg: ServiceConfig) -> ServiceConfig:
    """The settings a worker is made with: the router's, less the API keys, which workers never check. Ray keeps an
    actor's arguments (in its control store, to restart it), so a key there would outlive its rotation."""
    return cfg.model_copy(update={"api_key": None, "api_key_file": None})


def _enable_reflection(service_names: tuple[str, ...], server: grpc.aio.Server) -> None:
    """Serves reflection as ``grpc.reflection.v1alpha`` and ``grpc.reflection.v1``.

    grpcio-reflection ships only v1alpha; v1's messages are the same fields under a new package name, so the
    same servicer answers both (clients such as grpcurl and Postman try v1 first).
    """
    reflection.enable_server_reflection(service_names, server)
    servicer = reflection.aio.ReflectionServicer(service_names)
    method = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": method})]
    )


async def serve(config: ServiceConfig, *, on_ready=None) -> int:
    """Runs a server until SIGINT/SIGTERM; ``on_ready(server)`` is called once it serves. Returns 0."""
    heap_probe.start("router")
    gil_probe.start("router")
    server = MosaicServer(config)
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    # Ray installs its own SIGTERM handler when it starts on the main thread; ours must come after it.
    server.start_ray()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop_requested.set)
    try:
        # A signal during the (long) start-up must stop it too, so start and the signal race.
        starting = asyncio.create_task(server.start())
        stopping = asyncio.create_task(stop_requested.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            starting.result()  # raises if start-up failed
            if on_ready is not None:
                on_ready(server)
            await stopping
        else:
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
        log.info("shutting down: health NOT_SERVING, draining calls for %.1fs", config.shutdown_grace_s)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await server.stop()
    return 0

"""Building and running the daemon: the Adapterd service, health, reflection, and graceful shutdown.

The gRPC port opens at once with health NOT_SERVING, so orchestrators see the process; the base model
loads in a worker thread, and health turns SERVING when it is ready. On SIGTERM or SIGINT health turns
NOT_SERVING, new requests get UNAVAILABLE, requests in flight get ``grace`` seconds to finish, and the process
ends within ``grace`` plus a margin whatever is still blocked (``server/shutdown.py``). The port stays open
while the calls in flight finish, so that clients and probes read NOT_SERVING: grpc's ``server.stop`` closes
the listener and refuses every new call, health included, so it comes only once the drain is over.

The port is never shared with another daemon: grpc sets SO_REUSEPORT by default, and a second daemon on a
served port would print "listening" while the kernel split clients between the two. Only the front ends of one
daemon (``--frontends N``, ``core/frontends.py``) share theirs (``start_daemon(..., share_port=True)``).

Interceptors, outermost first: metrics (so that refusals are counted with their code), authentication, then
the concurrent-RPC budgets (``server/limits.py``), so that no call holds a slot of the callers' budget before
its token has been checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .auth import AuthInterceptor, TokenTable, load_tokens
from .config import ServerConfig
from .core.client import EngineClient
from .core.frontends import FrontEnds, frontend_count, make_shared_budgets
from .core.process import EngineProcess
from .core.router import CoreRouter, core_expositions, facade, mark_core
from .core.startup import connect_engine_cores, core_devices, engine_config, start_engine_cores
from .limits import BudgetInterceptor, RpcBudget, hard_rpc_cap
from .merge import Merger
from .metrics import DaemonMetrics
from .model_dir import check_base_dir
from .rpc_errors import hide_paths
from .runtime import Runtime
from .service import AdapterdService, ServingState
from .shutdown import SHUTDOWN_MARGIN_S, Shutdown, exit_now
from .tls import server_credentials
from .training import TrainingManager
from .validation import Limits

if TYPE_CHECKING:
    from .http_api import HttpFrontEnd
from ..v1 import adapterd_pb2 as pb
from ..v1 import adapterd_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Adapterd"].full_name  # "adapterd.v1.Adapterd"
CORE_METRICS_TIMEOUT_S = 5.0  # a scrape waits this long for the engine core's series, seconds
DRAIN_POLL_S = 0.05  # how often the drain looks at the count of calls in progress, seconds
@dataclass
class Daemon:
    """A running daemon: its server, its shared state, and the port it listens on."""

    config: ServerConfig
    server: grpc.aio.Server
    state: ServingState
    health: health.aio.HealthServicer
    port: int
    extras: list = field(default_factory=list)  # things to close on shutdown (metrics server...)
    metrics: DaemonMetrics | None = None  # set when config.metrics_port is not None
    budgets: BudgetInterceptor | None = None
    http: HttpFrontEnd | None = None  # set when config.http_port is not None
    engine_broken: asyncio.Event = field(default_factory=asyncio.Event)  # set when the engine cannot serve
    engine_processes: list[EngineProcess] = field(default_factory=list)  # one per --device entry (engine_process)
    frontends: FrontEnds | None = None  # front ends 2..N, when this is the first of several (config.frontends)
    _loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)
    _tasks: set[asyncio.Future] = field(default_factory=set)  # started from callbacks: kept until the daemon ends

    @property
    def engine_process(self) -> EngineProcess | None:
        """The (first) engine core's process; None without ``--engine-process``."""
        return self.engine_processes[0] if self.engine_processes else None

    async def load(self) -> None:
        """Load the base model (in the engine-core process, or off the event loop here), then turn SERVING."""
        cfg = self.config
        if not cfg.engine_process:
            runtime = await asyncio.to_thread(Runtime.load, cfg.base, cfg.adapters, cfg.quantization,
                                              engine_config(cfg), cfg.device, cfg.dtype, None,
                                              cfg.adapter_cache_mb * 2**20)
            if self.metrics is not None:
                self.metrics.attach(runtime)  # before SERVING, so that every request is counted
            loop = asyncio.get_running_loop()
            runtime.engine.breakage.listen(lambda reason: loop.call_soon_threadsafe(self._engine_failed))
            await self._serve_with(runtime)
            return
        self.engine_processes, clients = await start_engine_cores(
            cfg, on_down=self.engine_core_down, on_up=self.engine_core_up,
            on_give_up=lambda reason: self._engine_failed())
        client = facade(clients, core_devices(cfg))
        if self.metrics is not None:
            self.metrics.attach_engine_core(client.model_info(), self._core_metrics)
            client.on_adapter_used = self.metrics.labels.record_use
            if isinstance(client, CoreRouter):
                self.metrics.attach_router(client)
        count = frontend_count(cfg)
        if count > 1:
            shared = (self.budgets.callers.shared, self.budgets.open_calls.shared)
            self.frontends = FrontEnds(cfg, self.port, [c.address for c in clients], shared)
            await self.frontends.start(count)
            if self.metrics is not None:
                self.metrics.served.front_ends = self.frontends.expositions
        await self._serve_with(client)

    async def attach_engine_cores(self, addresses: list[str]) -> None:
        """Front ends 2..N (``core/frontends.py``): serve through the engine cores the first one started."""
        client = facade(await connect_engine_cores(self.config, addresses), core_devices(self.config))
        if self.metrics is not None:
            self.metrics.set_build_info(Path(client.model_info().base_model), client.model_info().quantization)
            client.on_adapter_used = self.metrics.labels.record_use
            if isinstance(client, CoreRouter):
                self.metrics.attach_router(client)
        await self._serve_with(client)

    async def _serve_with(self, runtime: Runtime | EngineClient | CoreRouter) -> None:
        cfg = self.config
        sequence = runtime.model_info().max_sequence_length
        max_input = min(cfg.max_input_tokens or sequence - 1, sequence - 1)
        self.state.limits = Limits(max_new_tokens=cfg.max_new_tokens,
                                   default_max_new_tokens=cfg.default_max_new_tokens, max_input_tokens=max_input)
        self.state.merger = Merger(cfg.base, cfg.adapters, output_root=cfg.merge_output_root)
        if cfg.runs is not None:
            self.state.training = TrainingManager(cfg.runs, cfg.adapters, cfg.base, cfg.quantization)
        self.state.runtime = runtime
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s", cfg.base)

    def _core_metrics(self) -> list[tuple[dict[str, str], bytes]]:
        """Each live engine core's exposition with the labels that tell the cores apart (none with one core),
        for a scrape (on the metrics server's thread)."""
        call = asyncio.run_coroutine_threadsafe(core_expositions(self.state.runtime), self._loop)
        return call.result(CORE_METRICS_TIMEOUT_S)

    def engine_core_down(self, index: int, reason: str) -> None:
        """Engine core ``index`` died and is being started again: its requests in flight end UNAVAILABLE; health
        turns NOT_SERVING when no core serves (the others take its adapters meanwhile: ``core/router.py``)."""
        runtime = self.state.runtime
        mark_core(runtime, index, up=False)
        if self.frontends is not None:
            self.frontends.tell("down", index, reason)
        if runtime is None or not runtime.up:
            self._tasks.add(asyncio.ensure_future(self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)))

    def engine_core_up(self, index: int) -> None:
        mark_core(self.state.runtime, index, up=True)
        if self.frontends is not None:
            self.frontends.tell("up", index)
        if not self.state.draining:
            log.info("the engine core serves again")
            self._tasks.add(asyncio.ensure_future(self._set_health(health_pb2.HealthCheckResponse.SERVING)))

    def _engine_failed(self) -> None:
        """The engine cannot serve (device failure, dead thread): refuse work, NOT_SERVING, tell ``serve``."""
        self.state.draining = True
        self.engine_broken.set()
        self._tasks.add(asyncio.ensure_future(self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)))

    async def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def shutdown(self, grace: float = 30.0) -> bool:
        """Drain: calls in flight get ``grace`` seconds, the port still open (health NOT_SERVING), then the
        server stops and grpc cancels what is left. Each step is bounded by ``grace`` plus a margin; returns
        False when one did not end in time (a call ignoring its cancellation, an engine that does not stop)."""
        self.state.draining = True
        await self.health.enter_graceful_shutdown()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        await self._calls_finished(deadline)  # HTTP requests hold slots of the same budget: drained too
        left = max(0.0, deadline - loop.time())  # what the drain left of the grace period, seconds
        if self.http is not None:
            await self.http.stop(left)
        drained = await _within(self.server.stop(left), left + SHUTDOWN_MARGIN_S, "stopping the server")
        if self.frontends is not None:
            drained &= await self.frontends.stop(grace)
        if self.engine_processes:
            stopped = await asyncio.gather(*(p.stop(SHUTDOWN_MARGIN_S) for p in self.engine_processes))
            drained &= all(stopped)
            if self.state.runtime is not None:
                self.state.runtime.close()
        elif isinstance(self.state.runtime, EngineClient | CoreRouter):  # front ends 2..N: the first stops cores
            self.state.runtime.close()
        elif self.state.runtime is not None:
            drained &= await _within(asyncio.to_thread(self.state.runtime.close), SHUTDOWN_MARGIN_S,
                                     "stopping the engine")
        for extra in self.extras:
            extra.close()
        return drained

    async def _calls_finished(self, deadline: float) -> None:
        """Wait until no Adapterd call is in progress, or the loop's clock reaches ``deadline``. The port stays
        open meanwhile: health answers NOT_SERVING, new Adapterd calls get UNAVAILABLE (``state.draining``)."""
        if self.budgets is None:
            return
        loop = asyncio.get_running_loop()
        while self.budgets.callers.in_use > 0 and loop.time() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)


async def _within(awaitable: Awaitable[object], seconds: float, what: str) -> bool:
    """Await ``awaitable`` for at most ``seconds``; False (logged) if it did not finish."""
    try:
        await asyncio.wait_for(asyncio.shield(asyncio.ensure_future(awaitable)), seconds)
        return True
    except TimeoutError:
        log.error("%s took longer than %.0f s; going on without it", what, seconds)
        return False


async def start_daemon(config: ServerConfig, *, share_port: bool = False, frontend_index: int = 0,
                       shared_budgets: tuple | None = None) -> Daemon:
    """Open the port (health NOT_SERVING) and return; call ``Daemon.load`` to load the model.

    ``share_port``: let other servers that ask for it too listen on the same port (SO_REUSEPORT), the kernel
    spreading connections among them; only for front ends of one deployment. Off, a port another process
    serves is refused like any busy port. ``frontend_index``: 0 for the daemon's first (or only) front end,
    which serves ``/metrics``; front ends 2..N count their RPCs for it without a metrics server of their own.
    ``shared_budgets``: the concurrent-RPC semaphores all front ends take from (``frontends.py``); the first
    front end makes them when the config asks for several.

    The base directory, the tokens file and the TLS files are checked first: a bad one stops start-up with
    its name before anything listens. Interceptors run outermost first: metrics, then auth, then the RPC
    budgets, so that refused calls are counted with their UNAUTHENTICATED / PERMISSION_DENIED /
    RESOURCE_EXHAUSTED code, and a call takes a budget slot only once its token has been checked.
    """
    check_base_dir(config.base)
    hide_paths({"<base model>": config.base, "<adapter root>": config.adapters, "<runs root>": config.runs,
                "<merge output root>": config.merge_output_root})
    # Process-wide, and the daemon owns the process: the engine thread gets the GIL back within this long
    # after each torch call (bench/NOTES.md, "gRPC end to end").
    sys.setswitchinterval(config.gil_switch_interval_ms / 1000)
    tokens = load_tokens(config.tokens_file) if config.tokens_file is not None else None
    credentials = (server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)
                   if config.tls_cert is not None else None)
    options = [("grpc.max_receive_message_length", config.max_message_bytes),
               ("grpc.max_send_message_length", config.max_message_bytes),
               # grpc's default is 1: see the module docstring. Front ends of one daemon share the port.
               ("grpc.so_reuseport", int(share_port or frontend_count(config) > 1))]
    metrics = (DaemonMetrics.for_config(config, frontend_index) if config.metrics_port is not None else None)
    if metrics is not None and frontend_index == 0:
        try:
            metrics.start_http(config.metrics_port, config.host)
        except OSError as exc:
            raise ValueError(f"--metrics-port {config.metrics_port}: cannot listen on {config.host}: "
                             f"{exc.strerror or exc}") from exc
    interceptors: list[grpc.aio.ServerInterceptor] = [metrics.interceptor] if metrics is not None else []
    if tokens is not None:
        interceptors.append(AuthInterceptor(tokens))
    if shared_budgets is None and frontend_count(config) > 1:
        shared_budgets = make_shared_budgets(config)
    callers, open_calls = shared_budgets or (None, None)
    budgets = BudgetInterceptor(RpcBudget("adapterd.v1", config.max_concurrent_rpcs, "--max-concurrent-rpcs",
                                          shared=callers),
                                RpcBudget("health and reflection", config.max_open_rpcs, "--max-open-rpcs",
                                          shared=open_calls))
    interceptors.append(budgets)
    server = grpc.aio.server(options=options, interceptors=interceptors,
                             maximum_concurrent_rpcs=hard_rpc_cap(config.max_concurrent_rpcs, config.max_open_rpcs))
    state = ServingState()
    # The HTTP API is served by the first front end only (front ends 2..N serve gRPC).
    http = (_http_front_end(config, state, tokens, budgets, metrics)
            if config.http_port is not None and frontend_index == 0 else None)
    pb_grpc.add_AdapterdServicer_to_server(AdapterdService(state), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server)
    address = f"{config.host}:{config.port}"
    port = (server.add_secure_port(address, credentials) if credentials is not None
            else server.add_insecure_port(address))
    await server.start()
    if http is not None:
        http.start()
    log.info("adapterd listening on %s:%d (%s%s)", config.host, port,
             "mutual TLS" if config.tls_client_ca else ("TLS" if credentials else "plaintext"),
             ", bearer tokens" if tokens is not None else "")
    return Daemon(config=config, server=server, state=state, health=health_servicer, port=port,
                  extras=[metrics] if metrics is not None else [], metrics=metrics, budgets=budgets, http=http)


def _http_front_end(config: ServerConfig, state: ServingState, tokens: TokenTable | None,
                    budgets: BudgetInterceptor, metrics: DaemonMetrics | None) -> HttpFrontEnd:
    """The OpenAI-compatible front end (``server/http_api``) on ``--http-port``, sharing the gRPC service's
    state, tokens, callers' budget and metrics; its port bound now, so that a busy one stops start-up."""
    from .http_api import HttpApi, HttpFrontEnd

    api = HttpApi(state, config.base.name or str(config.base), tokens, budgets.callers, metrics,
                  config.max_message_bytes)
    try:
        return HttpFrontEnd(api, config.host, config.http_port, config.tls_cert, config.tls_key, config.tls_client_ca)
    except OSError as exc:
        raise ValueError(f"--http-port {config.http_port}: cannot listen on {config.host}: "
                         f"{exc.strerror or exc}") from exc


async def serve(config: ServerConfig, grace: float = 30.0) -> None:
    """Run until SIGTERM/SIGINT, then drain and return. A bad base directory, tokens file or TLS file, or an
    address or port that cannot be bound, exits 2 and a base that fails to load exits 1, each with one log line
    saying why."""
    try:
        daemon = await start_daemon(config)
    except (ValueError, OSError, RuntimeError) as exc:  # a bad flag or file, a port that cannot be bound
        log.debug("start-up failed", exc_info=True)  # the operator needs the one line; a developer the trace
        log.error("cannot start: %s", _start_error(exc, config))
        raise SystemExit(2) from None
    print(f"adapterd listening on {config.host}:{daemon.port}", flush=True)
    shutdown = Shutdown(asyncio.get_running_loop(), grace)
    shutdown.install()
    try:
        await _serve_until_stopped(daemon, shutdown)
    finally:
        shutdown.uninstall()


def _start_error(exc: BaseException, config: ServerConfig) -> str:
    """The one line for a start-up error, naming the flags at fault: gRPC's own message for an address it
    cannot bind names neither flag nor cause."""
    if isinstance(exc, RuntimeError) and "Failed to bind" in str(exc):
        return (f"--host {config.host} --port {config.port}: cannot listen there (another process, perhaps "
                "another adapterd, serves that port, or the host is not an address of this machine)")
    return str(exc)


async def _serve_until_stopped(daemon: Daemon, shutdown: Shutdown) -> None:
    loader = asyncio.create_task(daemon.load())
    stopping = asyncio.create_task(shutdown.requested.wait())
    await asyncio.wait({loader, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if loader.done() and not loader.cancelled() and loader.exception() is not None:
        # A base that cannot load would otherwise leave a port NOT_SERVING forever: say why and exit 1.
        log.error("cannot load the base model %s: %s", daemon.config.base, loader.exception())
        stopping.cancel()
        await daemon.shutdown(0)
        raise SystemExit(1)
    broken = asyncio.create_task(daemon.engine_broken.wait())
    await asyncio.wait({stopping, broken}, return_when=asyncio.FIRST_COMPLETED)
    if broken.done():  # a supervisor restarts the daemon; staying up would answer UNAVAILABLE forever
        await daemon.shutdown(min(shutdown.grace, 5.0))
        exit_now(1, "the engine cannot serve any more: exiting (1) so that a supervisor restarts the daemon")
    broken.cancel()
    log.info("shutting down: draining for up to %.0f s", shutdown.grace)
    loader.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await loader
    shutdown.finish(await daemon.shutdown(shutdown.grace))


class DaemonThread:
    """A daemon in a background thread with its own event loop: for tests and embedding."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.daemon: Daemon | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="adapterd-daemon", daemon=True)

    def start(self, load: bool = True) -> DaemonThread:
        self._thread.start()
        self._started.wait()
        if self._error:
            raise self._error
        if load:
            self.run(self.daemon.load())
        return self

    @property
    def port(self) -> int:
        return self.daemon.port

    def run(self, coro):
        """Run a coroutine on the daemon's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self, grace: float = 5.0) -> None:
        if self.daemon is not None:
            self.run(self.daemon.shutdown(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.daemon = self.loop.run_until_complete(start_daemon(self.config))
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._error = exc
        finally:
            self._started.set()
        if self._error is None:
            self.loop.run_forever()

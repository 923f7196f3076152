"""The HTTP front end's server: uvicorn on the daemon's own event loop, beside grpc.aio.

Why the same loop rather than a thread of its own: every piece the front end shares with gRPC (the
callers' RPC budget, the tokenizing lanes' counters, the runtime's per-loop event hand-off, the drain's
count of calls in flight) is used from the event loop only; a second loop would make each of them
cross threads. HTTP work costs the loop what the same work over gRPC costs it (both share the GIL with the
engine thread either way), and an idle front end costs one wake-up each 0.1 s (uvicorn's tick). The
daemon owns SIGTERM and SIGINT, so uvicorn's own signal handlers are left out: in the main thread they would
take the signal first and close the HTTP port before the daemon's drain turns health NOT_SERVING (uvicorn
raises the signal again only once its server has stopped).

The port is bound at start-up, before anything listens, so that a busy ``--http-port`` stops start-up with
one line naming the flag, as a busy ``--port`` does. With ``--tls-cert`` the front end serves HTTPS with the
same certificate and key, and with ``--tls-client-ca`` requires client certificates too: the daemon never
serves plaintext beside a TLS port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from .routes import HttpApi

log = logging.getLogger(__name__)

TICK_S = 0.1  # uvicorn's main loop checks should_exit this often (seconds)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """The daemon handles SIGTERM/SIGINT (module docstring): install nothing."""
        yield


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (0: a free port); OSError when it cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # rebinding after a restart (TIME_WAIT)
        sock.bind((host, port))
        sock.listen(socket.SOMAXCONN)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class HttpFrontEnd:
    """``api`` served on ``host:port`` from the running event loop (``start``) until ``stop``."""

    def __init__(self, api: HttpApi, host: str, port: int, tls_cert: Path | None = None,
                 tls_key: Path | None = None, tls_client_ca: Path | None = None) -> None:
        tls = {} if tls_cert is None else {"ssl_certfile": str(tls_cert), "ssl_keyfile": str(tls_key)}
        if tls_client_ca is not None:
            tls.update(ssl_ca_certs=str(tls_client_ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
        config = uvicorn.Config(api.app(), log_config=None, access_log=False, lifespan="off", ws="none",
                                server_header=False, **tls)
        self.socket = bind(host, port)
        self.host, self.port = host, int(self.socket.getsockname()[1])
        self.server = _Server(config)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self.server.serve(sockets=[self.socket]))
        log.info("OpenAI-compatible HTTP on http://%s:%d/v1", self.host, self.port)

    async def stop(self, timeout: float) -> bool:
        """Stop listening, finish the requests in flight within ``timeout`` seconds, then close the rest.
        False when uvicorn had to be forced."""
        if self._task is None:
            self.socket.close()
            return True
        self.server.should_exit = True
        done, _ = await asyncio.wait({self._task}, timeout=timeout + TICK_S)
        if not done:
            self.server.force_exit = True
            await asyncio.wait({self._task}, timeout=1.0)
        self.socket.close()
        return bool(done)

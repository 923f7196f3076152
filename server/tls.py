"""TLS and mutual TLS for the daemon's port.

``--tls-cert`` and ``--tls-key`` (PEM) turn on TLS; ``--tls-client-ca`` (PEM bundle) also requires every
client to present a certificate signed by that CA, and refuses the handshake otherwise. The files are read
once at start-up, and any problem is reported naming the flag, before the port opens, so that a daemon
never silently falls back to plaintext.
"""

from __future__ import annotations

from pathlib import Path

import grpc


def _read(path: Path, flag: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{flag} {path}: cannot read it: {exc}") from exc
    if b"-----BEGIN " not in data:
        raise ValueError(f"{flag} {path}: not a PEM file")
    return data


def server_credentials(cert: Path, key: Path, client_ca: Path | None = None) -> grpc.ServerCredentials:
    """Credentials for ``add_secure_port``; with ``client_ca``, client certificates are required and
    verified against it (mutual TLS)."""
    chain = _read(cert, "--tls-cert")
    private_key = _read(key, "--tls-key")
    ca = _read(client_ca, "--tls-client-ca") if client_ca is not None else None
    return grpc.ssl_server_credentials([(private_key, chain)], root_certificates=ca,
                                       require_client_auth=ca is not None)

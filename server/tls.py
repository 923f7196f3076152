"""TLS and mutual TLS for the daemon's port.

``--tls-cert`` and ``--tls-key`` (PEM) turn on TLS; ``--tls-client-ca`` (PEM bundle) also requires every
client to present a certificate signed by that CA, and refuses the handshake otherwise. The files are read
once at start-up, and any problem is reported naming the flag, before the port opens, so that a daemon
never silently falls back to plaintext.
"""

from __future__ import annotations

import ssl
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
    _check_pair(cert, key)
    if client_ca is not None:
        _check_ca(client_ca)
    return grpc.ssl_server_credentials([(private_key, chain)], root_certificates=ca,
                                       require_client_auth=ca is not None)


def _check_pair(cert: Path, key: Path) -> None:
    """gRPC reports a certificate that does not match its key, or an unreadable one, only as "Failed to bind
    to address", naming neither file; OpenSSL (through ``ssl``) says which and why."""
    try:
        # A callable password that gives b"": an encrypted key fails here instead of prompting on a terminal.
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as exc:
        raise ValueError(f"--tls-cert {cert} and --tls-key {key}: {_reason(exc)}") from exc


def _check_ca(client_ca: Path) -> None:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(cafile=client_ca)
    except ssl.SSLError as exc:
        raise ValueError(f"--tls-client-ca {client_ca}: {_reason(exc)}") from exc


def _reason(exc: ssl.SSLError) -> str:
    """OpenSSL's reason code ("KEY_VALUES_MISMATCH", "NO_START_LINE"), in words."""
    reason = exc.reason or str(exc)
    readable = {"KEY_VALUES_MISMATCH": "the key does not match the certificate"}
    return readable.get(reason, reason.lower().replace("_", " "))

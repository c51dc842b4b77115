"""Channel set-up shared by the client and the load generator.

Targets, TLS, keep-alive, message limits, and a service config with ``round_robin`` load
balancing, client-side health checking and a retry policy for the idempotent unary calls.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

logger = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""The server's default ``max_message_bytes``."""
FUSION_SERVICE = "fusionserve.v1.FusionService"
HEALTH_SERVICE = "grpc.health.v1.Health"
# Every unary call of the API is idempotent, so retrying UNAVAILABLE is safe. Streams are not
# listed: classify_stream resumes its unanswered items itself.
RETRIED_METHODS = (
    (FUSION_SERVICE, "Classify"),
    (FUSION_SERVICE, "Embed"),
    (FUSION_SERVICE, "Rank"),
    (FUSION_SERVICE, "ListModels"),
    (FUSION_SERVICE, "GetModel"),
    (HEALTH_SERVICE, "Check"),
)
RESUMABLE_CODES = ("UNAVAILABLE", "CANCELLED")
"""This replica cannot serve now: try another. UNAVAILABLE: no replica, or one that drains.
CANCELLED: a server that shuts down resets the calls it had received but not started (HTTP/2
RST_STREAM CANCEL, which reaches the client as CANCELLED); the client's own cancellations are never
retried, so for idempotent calls this is safe. A stream resumes its unanswered items elsewhere."""
RETRYABLE_CODES = (*RESUMABLE_CODES, "RESOURCE_EXHAUSTED")
"""What the unary calls' retry policy retries: the above, and RESOURCE_EXHAUSTED from an overloaded
server, which says when to come back (``grpc-retry-pushback-ms``): gRPC waits that long instead of its
own backoff. Under a lasting overload the retry throttling below stops retries altogether, so refused
calls never multiply the load."""
RETRY_POLICY = {
    "maxAttempts": 5,  # gRPC caps this at 5
    "initialBackoff": "0.1s",
    "maxBackoff": "2s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": list(RETRYABLE_CODES),
}


@dataclass(frozen=True)
class TLSConfig:
    """TLS for the channel; give a client certificate and key for mutual TLS."""

    root_certificates: bytes | None = None
    """PEM CA bundle that signed the server's certificate (None: the system's roots)."""
    certificate_chain: bytes | None = None
    """PEM client certificate, for mTLS."""
    private_key: bytes | None = None
    """PEM client key, for mTLS."""
    server_name: str | None = None
    """Name to verify the server certificate against, when it differs from the target's host."""

    @classmethod
    def from_files(
        cls,
        ca_cert: str | Path | None = None,
        client_cert: str | Path | None = None,
        client_key: str | Path | None = None,
        server_name: str | None = None,
    ) -> TLSConfig:
        """Read the PEM files.

        Raises:
            ValueError: only one of client_cert and client_key is given.
        """
        if (client_cert is None) != (client_key is None):
            raise ValueError("mutual TLS needs both a client certificate and its key")

        def read(path: str | Path | None) -> bytes | None:
            return None if path is None else Path(path).read_bytes()

        return cls(read(ca_cert), read(client_cert), read(client_key), server_name)

    def credentials(self) -> grpc.ChannelCredentials:
        """The gRPC channel credentials."""
        return grpc.ssl_channel_credentials(self.root_certificates, self.private_key, self.certificate_chain)


def _split_host_port(target: str) -> tuple[str, int]:
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"a target must be HOST:PORT, got {target!r}")
    return host.strip("[]"), int(port)


def channel_target(target: str | Sequence[str]) -> str:
    """The gRPC target URI for one target, or for several replicas balanced by ``round_robin``.

    One string is used as it is (``host:port``, ``dns:///name:port``, ``ipv4:…``, ``unix:…``).
    Several ``HOST:PORT`` strings become one static ``ipv4:`` (or ``ipv6:``) address list; host
    names among them are resolved once, now. For replicas that come and go (a Kubernetes headless
    Service), pass one ``dns:///name:port`` target instead: gRPC re-resolves it.

    Raises:
        ValueError: a target is malformed, does not resolve, or IPv4 and IPv6 are mixed.
    """
    if isinstance(target, str):
        return target
    targets = list(target)
    if not targets:
        raise ValueError("no target given")
    if len(targets) == 1:
        return targets[0]
    v4: list[str] = []
    v6: list[str] = []
    for t in targets:
        if "://" in t or t.startswith(("ipv4:", "ipv6:", "unix:", "dns:")):
            raise ValueError(f"several targets must each be HOST:PORT, got {t!r}")
        host, port = _split_host_port(t)
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            address = _resolve(host, port)
        if address.version == 4:
            v4.append(f"{address}:{port}")
        else:
            v6.append(f"[{address}]:{port}")
    if v4 and v6:
        raise ValueError(f"targets mix IPv4 and IPv6 addresses: {targets}")
    return ("ipv4:" + ",".join(v4)) if v4 else ("ipv6:" + ",".join(v6))


def _resolve(host: str, port: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ValueError(f"cannot resolve {host!r}: {e}") from e
    infos.sort(key=lambda info: info[0] != socket.AF_INET)  # prefer IPv4
    return ipaddress.ip_address(infos[0][4][0])


def service_config(*, retries: bool = True, health_check: bool = True) -> dict[str, Any]:
    """The gRPC service config: round_robin, optional health checking and retry policy."""
    config: dict[str, Any] = {"loadBalancingConfig": [{"round_robin": {}}]}
    if health_check:
        # round_robin then skips replicas whose overall health ("") is not SERVING, e.g. draining
        # ones; a server without the health service counts as healthy.
        config["healthCheckConfig"] = {"serviceName": ""}
    if retries:
        config["methodConfig"] = [
            {
                "name": [{"service": s, "method": m} for s, m in RETRIED_METHODS],
                "retryPolicy": RETRY_POLICY,
            }
        ]
        # Stop retrying when most calls fail (the whole fleet is down), instead of multiplying load.
        config["retryThrottling"] = {"maxTokens": 100, "tokenRatio": 0.1}
    return config


def channel_options(
    *,
    retries: bool = True,
    health_check: bool = True,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    keepalive_time_s: float = 60.0,
    keepalive_timeout_s: float = 20.0,
    tls: TLSConfig | None = None,
    separate_connection: bool = False,
) -> list[tuple[str, Any]]:
    """Channel arguments for :func:`create_channel`."""
    options: list[tuple[str, Any]] = [
        ("grpc.service_config", json.dumps(service_config(retries=retries, health_check=health_check))),
        ("grpc.enable_retries", 1 if retries else 0),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # Pings find a dead connection (a replica gone without closing its socket) so streams break
        # with UNAVAILABLE and resume elsewhere. Only while calls are active: a server's default ping
        # policy (at most one ping per 5 minutes without data, 2 strikes) then never sends GOAWAY,
        # since gRPC sends at most 2 pings without data.
        ("grpc.keepalive_time_ms", int(keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 0),
        # Reconnect quickly to a replica that restarts (the defaults back off to 120 s).
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 5000),
    ]
    if tls is not None and tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    if separate_connection:
        options.append(("grpc.use_local_subchannel_pool", 1))
    return options


def create_channel(target: str | Sequence[str], *, tls: TLSConfig | None = None, **options: Any) -> grpc.aio.Channel:
    """A ``grpc.aio`` channel (create it on the event loop that will use it).

    Args:
        target: see :func:`channel_target`.
        tls: TLS settings; None for plaintext.
        **options: keyword arguments of :func:`channel_options`.
    """
    uri = channel_target(target)
    args = channel_options(tls=tls, **options)
    if tls is None:
        return grpc.aio.insecure_channel(uri, options=args)
    return grpc.aio.secure_channel(uri, tls.credentials(), options=args)

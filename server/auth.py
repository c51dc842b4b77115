"""Bearer-token authentication as one server interceptor; TLS credentials from settings."""

from __future__ import annotations

import hmac
import logging
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from fusionserve.server.grpc_errors import HANDLER_FACTORIES, handler_kind
from fusionserve.server.settings import ServerSettings

logger = logging.getLogger(__name__)

HEALTH_PREFIX = "/grpc.health.v1.Health/"


def load_tokens(path: Path) -> list[bytes]:
    """Accepted tokens: one per line, blank lines and ``#`` comments ignored."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ValueError(f"auth token file {str(path)!r}: {e.strerror or e}") from e
    tokens = [line.strip().encode() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not tokens:
        raise ValueError(f"auth token file {str(path)!r} holds no token")
    return tokens


def server_credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    """TLS (or mutual TLS) credentials, or None for plaintext."""
    if not settings.tls_cert or not settings.tls_key:
        return None
    try:
        key, cert = Path(settings.tls_key).read_bytes(), Path(settings.tls_cert).read_bytes()
        client_ca = Path(settings.tls_client_ca).read_bytes() if settings.tls_client_ca else None
    except OSError as e:
        raise ValueError(f"TLS file {e.filename!r}: {e.strerror}") from e
    # gRPC reads the PEM files only when the port is bound, after the models have loaded, and then
    # says no more than "failed to bind": check them now with the ssl module, naming the file.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except ssl.SSLError as e:
        raise ValueError(
            f"TLS certificate {str(settings.tls_cert)!r} and key {str(settings.tls_key)!r}: not a PEM certificate "
            f"chain and its private key ({e.reason or e})"
        ) from e
    if settings.tls_client_ca:
        try:
            context.load_verify_locations(cafile=settings.tls_client_ca)
        except ssl.SSLError as e:
            ca = str(settings.tls_client_ca)
            raise ValueError(f"TLS client CA {ca!r}: not PEM certificates ({e.reason or e})") from e
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca, require_client_auth=bool(client_ca))


def _deny(kind: str) -> grpc.RpcMethodHandler:
    async def unary(request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")

    async def stream(request: object, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
        yield  # pragma: no cover - makes this an async generator

    return HANDLER_FACTORIES[kind](stream if kind.endswith("_stream") else unary)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without ``authorization: Bearer <token>`` naming an accepted token."""

    def __init__(self, tokens: list[bytes], *, exempt_health: bool = True) -> None:
        self._tokens = tokens
        self._exempt_health = exempt_health

    def _authorized(self, metadata: tuple[tuple[str, str | bytes], ...] | None) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                raw = value.encode() if isinstance(value, str) else value
                if raw[:7].lower() == b"bearer ":
                    given = raw[7:].strip()
                    # compare against every token in constant time, so timing reveals nothing
                    return any([hmac.compare_digest(given, t) for t in self._tokens])
        return False

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Pass authorised calls through; answer the rest UNAUTHENTICATED."""
        handler = await continuation(details)
        if handler is None or (self._exempt_health and details.method.startswith(HEALTH_PREFIX)):
            return handler
        if self._authorized(details.invocation_metadata):
            return handler
        return _deny(handler_kind(handler))

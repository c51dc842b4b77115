"""The asyncio client: the one implementation (the blocking client runs it on a private loop)."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import grpc

from fusionserve.client.channel import DEFAULT_MAX_MESSAGE_BYTES, TLSConfig, create_channel
from fusionserve.client.errors import FusionClientError
from fusionserve.client.health import HEALTH_CHECK, decode_status, encode_request
from fusionserve.client.inputs import ImageInput, image_bytes, invalid, pair, text_of
from fusionserve.client.results import (
    Classification,
    Embeddings,
    ModelInfo,
    RankedCandidate,
    StreamResult,
    classifications,
    embeddings,
    model_info,
    ranked,
)
from fusionserve.client.resumable_stream import Items, ResumableStream
from fusionserve.v1 import fusion_pb2 as pb
from fusionserve.v1 import fusion_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)


class AsyncFusionClient:
    """A fusionserve client for asyncio code.

    Create it inside a running event loop (gRPC binds a channel to its loop) and close it with
    ``await client.aclose()`` or ``async with``. Every call has a deadline; unary calls are
    retried by the channel's retry policy on UNAVAILABLE (and CANCELLED by a server shutting
    down), and on RESOURCE_EXHAUSTED after the wait an overloaded server asks for; they wait for
    a replica to be reachable (within the deadline) when ``wait_for_ready`` is on. Every failure
    raises :class:`FusionClientError`.

    Args:
        target: ``HOST:PORT``, a gRPC URI (``dns:///name:port`` for a Kubernetes headless
            Service), or a list of ``HOST:PORT`` replicas; calls are balanced round-robin.
        tls: True for TLS with the system's roots, a :class:`TLSConfig` (custom CA, mTLS), or
            False for plaintext.
        token: bearer token sent as ``authorization: Bearer …`` on every call.
        timeout_s: default deadline of each call (for streams: of each item).
        model: default pipeline (empty: the server's default, ``multimodal``).
        wait_for_ready: while no replica is reachable, wait (until the deadline) instead of
            failing at once. Health checks never wait.
        health_check: let round_robin skip replicas that report NOT_SERVING (e.g. draining).
        max_message_bytes: largest message sent or received.
        keepalive_time_s: ping interval on a connection with active calls.
        connections: HTTP/2 connections per replica, each its own channel; calls take them in
            turn. A server with several worker processes (``serve --workers N``) serves each
            connection in one worker (the kernel spreads connections, not calls), so give at least N
            to use them all from one client.
    """

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        tls: bool | TLSConfig = False,
        token: str | None = None,
        timeout_s: float = 30.0,
        model: str = "",
        wait_for_ready: bool = True,
        health_check: bool = True,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        keepalive_time_s: float = 60.0,
        connections: int = 1,
    ) -> None:
        if isinstance(connections, bool) or not isinstance(connections, int) or connections < 1:
            raise ValueError(f"connections must be a whole number >= 1, not {connections!r}")
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            # A grpc.aio channel belongs to the loop it was made on; one made outside any loop
            # breaks later, inside asyncio.run(). Say so now.
            raise RuntimeError(
                "create AsyncFusionClient inside a running event loop (in async code), or use FusionClient"
            ) from None
        self.target = target
        self.timeout_s = timeout_s
        self.default_model = model
        self.wait_for_ready = wait_for_ready
        tls_config = TLSConfig() if tls is True else (tls or None)
        if token and tls_config is None:
            logger.warning("sending a bearer token over plaintext to %s", target)
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        self._channel_args: dict[str, Any] = {
            "tls": tls_config,
            "max_message_bytes": max_message_bytes,
            "keepalive_time_s": keepalive_time_s,
        }
        # Several connections need channels that do not share one (gRPC shares equal channels' connections).
        self._channels = [
            create_channel(target, health_check=health_check, separate_connection=connections > 1, **self._channel_args)
            for _ in range(connections)
        ]
        self._channel = self._channels[0]
        self._stubs = [pb_grpc.FusionServiceStub(channel) for channel in self._channels]
        self._turn = itertools.count()
        # Health and model listings go through a channel without client-side health checking:
        # they must reach a replica that is NOT_SERVING, to report it.
        self._admin_channel: grpc.aio.Channel | None = None

    # ---- lifecycle ----------------------------------------------------------------------------
    async def aclose(self) -> None:
        """Close the channels (calls in flight are cancelled)."""
        for channel in self._channels:
            await channel.close()
        if self._admin_channel is not None:
            await self._admin_channel.close()

    async def __aenter__(self) -> AsyncFusionClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _admin(self) -> grpc.aio.Channel:
        if self._admin_channel is None:
            self._admin_channel = create_channel(self.target, health_check=False, **self._channel_args)
        return self._admin_channel

    # ---- plumbing -----------------------------------------------------------------------------
    @property
    def _stub(self) -> pb_grpc.FusionServiceStub:
        """The next connection's stub, in turn (a stream reopened after a fault takes the next one)."""
        return self._stubs[next(self._turn) % len(self._stubs)]

    async def _unary(self, method: Any, request: Any, timeout_s: float | None, *, wait: bool | None = None) -> Any:
        timeout = self.timeout_s if timeout_s is None else timeout_s
        wait_for_ready = self.wait_for_ready if wait is None else wait
        limit = self._channel_args["max_message_bytes"]
        if hasattr(request, "ByteSize") and (size := request.ByteSize()) > limit:
            # Checked here: gRPC's own refusal is RESOURCE_EXHAUSTED, which the retry policy would retry.
            raise FusionClientError(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"request of {size} bytes is over the {limit} byte message limit: "
                                    "send fewer or smaller items per call")  # fmt: skip
        try:
            return await method(request, timeout=timeout, metadata=self._metadata, wait_for_ready=wait_for_ready)
        except grpc.aio.AioRpcError as e:
            raise self._error(e, wait_for_ready) from e

    def _error(self, e: grpc.RpcError, waited: bool) -> FusionClientError:
        error = FusionClientError.from_rpc_error(e)
        if error.code == grpc.StatusCode.DEADLINE_EXCEEDED and waited:
            state = self._channel.get_state(try_to_connect=False)
            if state == grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                error = FusionClientError(
                    error.code, f"{error.details} (no replica of {self.target} could be reached meanwhile)"
                )
        return error

    def _request(
        self, items: Iterable[Any], model: str | None, model_version: int, return_embeddings: bool, request_id: str = ""
    ) -> pb.ClassifyRequest:
        request = pb.ClassifyRequest(
            model=self.default_model if model is None else model,
            model_version=model_version,
            return_embeddings=return_embeddings,
            request_id=request_id,
        )
        for item in items:
            image, text = pair(item)
            request.items.add(image=image_bytes(image), text=text_of(text))
        return request

    # ---- the API ------------------------------------------------------------------------------
    async def classify(
        self,
        image: ImageInput,
        text: str,
        *,
        model: str | None = None,
        model_version: int = 0,
        return_embeddings: bool = False,
        timeout_s: float | None = None,
    ) -> Classification:
        """Classify one (image, text) pair.

        Args:
            image: a file path, encoded bytes (PNG, JPEG, BMP) or a BGR uint8 array.
            text: the caption.
            model: pipeline name (default: the client's).
            model_version: 0 for the latest.
            return_embeddings: also return the image and text embeddings.
            timeout_s: deadline (default: the client's).

        Raises:
            FusionClientError: with the status code and the server's message.
        """
        results = await self.classify_batch(
            [(image, text)],
            model=model,
            model_version=model_version,
            return_embeddings=return_embeddings,
            timeout_s=timeout_s,
        )
        return results[0]

    async def classify_batch(
        self,
        items: Iterable[Any],
        *,
        model: str | None = None,
        model_version: int = 0,
        return_embeddings: bool = False,
        timeout_s: float | None = None,
    ) -> list[Classification]:
        """Classify (image, text) pairs in one call (at most the model's max batch size).

        Any bad item fails the whole call with INVALID_ARGUMENT naming the item.

        Raises:
            FusionClientError: with the status code and the server's message.
        """
        request = self._request(items, model, model_version, return_embeddings)
        if not request.items:
            raise FusionClientError(grpc.StatusCode.INVALID_ARGUMENT, "classify_batch needs at least one item")
        response = await self._unary(self._stub.Classify, request, timeout_s)
        return classifications(response)

    def classify_stream(
        self,
        items: Items,
        *,
        window: int = 16,
        model: str | None = None,
        model_version: int = 0,
        return_embeddings: bool = False,
        timeout_s: float | None = None,
        max_resumes: int = 3,
    ) -> AsyncIterator[StreamResult]:
        """Classify a (possibly endless) iterable of pairs over one bidirectional stream.

        Results are yielded as they arrive (completion order), each with its item's ``index``.
        At most ``window`` items are unanswered or unconsumed at any time: the next item is taken
        from ``items`` only when a result has been consumed. A bad item comes back with
        ``error`` set and the stream goes on. When the stream breaks with UNAVAILABLE (its
        replica died or drains), the unanswered items are sent again on a new stream, which
        round_robin places on a live replica: no item is lost or yielded twice. (CANCELLED from
        the server counts as UNAVAILABLE: a server shutting down resets calls it had not started;
        the stream cancels itself only when it is abandoned.)

        Args:
            items: (image, text) pairs, from an iterable or an async iterable (a plain iterable
                is iterated on the event loop, so it must not block).
            window: the most items in flight.
            model: pipeline name (default: the client's).
            model_version: 0 for the latest.
            return_embeddings: also return embeddings.
            timeout_s: each item must be answered within this time after it is sent.
            max_resumes: new streams allowed in a row without an answer in between.

        Raises:
            FusionClientError: a stream-level failure other than UNAVAILABLE, UNAVAILABLE more
                than ``max_resumes`` times in a row, or an item unanswered within ``timeout_s``.
        """
        if window < 1:
            raise ValueError("window must be >= 1")

        def make_request(item: Any, index: int) -> pb.ClassifyRequest:
            return self._request([item], model, model_version, return_embeddings, request_id=str(index))

        stream = ResumableStream(
            open_call=lambda: self._stub.ClassifyStream(metadata=self._metadata, wait_for_ready=self.wait_for_ready),
            items=items,
            make_request=make_request,
            window=window,
            timeout_s=self.timeout_s if timeout_s is None else timeout_s,
            max_resumes=max_resumes,
        )
        return stream.results()

    async def embed(
        self,
        images: Sequence[ImageInput] = (),
        texts: Sequence[str] = (),
        *,
        model: str | None = None,
        model_version: int = 0,
        timeout_s: float | None = None,
    ) -> Embeddings:
        """Image and/or text embeddings (one row per input).

        Raises:
            FusionClientError: with the status code and the server's message.
        """
        request = pb.EmbedRequest(
            images=[image_bytes(i) for i in images],
            texts=[text_of(t) for t in texts],
            model=self.default_model if model is None else model,
            model_version=model_version,
        )
        response = await self._unary(self._stub.Embed, request, timeout_s)
        return embeddings(response, len(request.images), len(request.texts))

    async def rank(
        self,
        *,
        image: ImageInput | None = None,
        text: str | None = None,
        images: Sequence[ImageInput] = (),
        texts: Sequence[str] = (),
        top_k: int | None = None,
        model: str | None = None,
        model_version: int = 0,
        timeout_s: float | None = None,
    ) -> list[RankedCandidate]:
        """One query against candidates of the other modality, best first.

        ``rank(image=…, texts=[…])`` or ``rank(text=…, images=[…])``; each candidate comes back with
        its ``index`` among those sent and its ``score`` (match probability); ``top_k`` keeps the best.
        The server encodes the query once.

        Raises:
            FusionClientError: INVALID_ARGUMENT for no query or two, no candidates or too many, or a bad
                one (named by its index).
        """
        if (image is None) == (text is None):
            raise invalid("rank needs one query: image=… or text=…")
        request = pb.RankRequest(
            images=[image_bytes(i) for i in images],
            texts=[text_of(t) for t in texts],
            top_k=top_k or 0,
            model=self.default_model if model is None else model,
            model_version=model_version,
        )
        if image is not None:
            request.image = image_bytes(image)
        else:
            request.text = text_of(text)
        return ranked(await self._unary(self._stub.Rank, request, timeout_s))

    async def models(self, *, timeout_s: float | None = None) -> list[ModelInfo]:
        """Every loaded model version, with its state (ready or not, and why).

        Raises:
            FusionClientError: with the status code and the server's message.
        """
        stub = pb_grpc.FusionServiceStub(self._admin())
        response = await self._unary(stub.ListModels, pb.ListModelsRequest(), timeout_s)
        return [model_info(m) for m in response.models]

    async def model(self, name: str, version: int = 0, *, timeout_s: float | None = None) -> ModelInfo:
        """One model (its latest loaded version unless ``version`` is given).

        Raises:
            FusionClientError: NOT_FOUND for an unknown model or version.
        """
        stub = pb_grpc.FusionServiceStub(self._admin())
        return model_info(await self._unary(stub.GetModel, pb.GetModelRequest(name=name, version=version), timeout_s))

    async def load_model(self, name: str, *, timeout_s: float | None = None) -> list[ModelInfo]:
        """Load ``name`` from the server's repository (its versions by policy); its versions after.

        Only for servers run with ``--model-control-mode explicit``.

        Raises:
            FusionClientError: FAILED_PRECONDITION in another mode, NOT_FOUND for a model not in the
                repository.
        """
        stub = pb_grpc.FusionServiceStub(self._admin())
        response = await self._unary(stub.LoadModel, pb.LoadModelRequest(name=name), timeout_s)
        return [model_info(m) for m in response.models]

    async def unload_model(self, name: str, *, timeout_s: float | None = None) -> list[ModelInfo]:
        """Unload every version of ``name`` once its calls are done; the server's models after.

        Only for servers run with ``--model-control-mode explicit``.

        Raises:
            FusionClientError: FAILED_PRECONDITION in another mode or while a loaded pipeline uses
                the model, NOT_FOUND for a model not loaded.
        """
        stub = pb_grpc.FusionServiceStub(self._admin())
        response = await self._unary(stub.UnloadModel, pb.UnloadModelRequest(name=name), timeout_s)
        return [model_info(m) for m in response.models]

    async def health(self, service: str = "", *, timeout_s: float | None = None) -> str:
        """The gRPC health status: ``SERVING``, ``NOT_SERVING``, ``SERVICE_UNKNOWN`` or ``UNKNOWN``.

        ``service`` is empty for the whole server, or a model name. Never waits for a replica:
        an unreachable server raises at once (after the retry policy's attempts).

        Raises:
            FusionClientError: the server cannot be reached (UNAVAILABLE) or times out.
        """
        check = self._admin().unary_unary(HEALTH_CHECK, request_serializer=encode_request,
                                          response_deserializer=decode_status)  # fmt: skip
        try:
            return await self._unary(check, service, timeout_s, wait=False)
        except FusionClientError as e:
            if e.code == grpc.StatusCode.NOT_FOUND:
                return "SERVICE_UNKNOWN"
            raise

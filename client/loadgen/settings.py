"""What a load test sends, how hard, and for how long."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from fusionserve.client.channel import TLSConfig


@dataclass
class LoadSettings:
    """What to send, how hard, and for how long."""

    target: list[str]
    """One or more ``HOST:PORT`` (balanced round-robin), or one gRPC URI."""
    api: str = "typed"
    """``typed`` (fusionserve.v1 Classify) or ``v2`` (KServe ModelInfer, BYTES inputs IMAGE/TEXT)."""
    mode: str = "unary"
    """``unary`` calls, or ``stream`` (bidirectional streams, requests matched by id)."""
    concurrency: int = 8
    """Closed loop: requests in flight (one worker each). Ignored when ``rate`` is set."""
    rate: float | None = None
    """Open loop: requests intended per second."""
    duration_s: float = 10.0
    """Measured time, after the warm-up."""
    warmup_s: float = 1.0
    """Load before measuring (not counted)."""
    batch_size: int = 1
    """Items per request."""
    inputs: str = "generated"
    """``generated`` (synthetic pairs) or a folder of images (captions.txt or file stems)."""
    model: str = "multimodal"
    """Pipeline model name."""
    timeout_s: float = 10.0
    """Deadline of each request."""
    streams: int = 0
    """Stream mode: streams to spread requests over (0: one per worker closed-loop, 4 open-loop)."""
    max_inflight: int = 10_000
    """Open loop: requests in flight at most; later ones wait (and are charged for waiting)."""
    connections: int = 1
    """HTTP/2 connections (channels) per target set."""
    progress: bool = True
    """Print a progress line to stderr every second."""
    tls: TLSConfig | None = field(default=None, repr=False)
    """TLS settings; None for plaintext."""
    token: str | None = field(default=None, repr=False)
    """Bearer token (never written to the report)."""

    def validate(self) -> None:
        """Raise ValueError naming the first setting that makes no sense."""
        if self.api not in ("typed", "v2"):
            raise ValueError(f"api must be typed or v2, not {self.api!r}")
        if self.mode not in ("unary", "stream"):
            raise ValueError(f"mode must be unary or stream, not {self.mode!r}")
        if self.rate is not None and self.rate <= 0:
            raise ValueError("rate must be > 0")
        if self.concurrency < 1 or self.batch_size < 1 or self.connections < 1 or self.max_inflight < 1:
            raise ValueError("concurrency, batch_size, connections and max_inflight must be >= 1")
        if self.duration_s <= 0 or self.warmup_s < 0 or self.timeout_s <= 0:
            raise ValueError("duration_s and timeout_s must be > 0, warmup_s >= 0")

    @property
    def open_loop(self) -> bool:
        """True when a rate is set."""
        return self.rate is not None

    def to_json(self) -> dict[str, Any]:
        """The settings for the report (no secrets)."""
        out = asdict(self)
        out.pop("token")
        out["tls"] = self.tls is not None
        out["token_set"] = bool(self.token)
        out["loop"] = "open" if self.open_loop else "closed"
        return out

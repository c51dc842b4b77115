"""Server settings: defaults < config file (JSON) < ``FUSIONSERVE_*`` environment < command line."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

ENV_PREFIX = "FUSIONSERVE_"


@dataclass
class ServerSettings:
    """Everything ``fusionserve serve`` can be told. Units are in the names."""

    repository: Path = Path("model-repository")
    """Model repository written by ``fusionserve export``."""
    model_control_mode: str = "poll"
    """``poll``: pick up versions exported while the server runs (and drop removed ones) every
    ``repository_poll_secs``; ``none``: read the repository once, at start; ``explicit``: load
    everything at start, then change only on load/unload calls (Triton's names)."""
    repository_poll_secs: float = 5.0
    """How often ``poll`` mode reads the repository (listing folders and file sizes: cheap)."""
    host: str = "[::]"
    """Address the gRPC server binds to."""
    port: int = 8001
    """gRPC port (0 picks a free one)."""
    workers: int | str = 1
    """Serving processes sharing the port (``SO_REUSEPORT``), each with its own event loop, models
    and batchers, under one supervisor that restarts them and sums their metrics. ``auto``: one per
    usable core (CPU affinity and cgroup quota), 1 with CUDA or ``model_control_mode`` explicit.
    1 is one plain process. See docs/DEPLOY.md#workers."""
    metrics_port: int = 8002
    """Prometheus metrics HTTP port (0 picks a free one, -1 disables)."""
    metrics_host: str = "0.0.0.0"
    """Address the metrics server binds to."""
    device: str = "auto"
    """``auto`` (CUDA when it loads, else CPU), ``cpu`` or ``cuda`` (refuse to start without it)."""
    cuda_device_id: int = 0
    """Which GPU the CUDA execution provider uses."""
    cuda_conv_algo_search: str = "HEURISTIC"
    """cuDNN convolution algorithm choice: ``HEURISTIC`` (cuDNN's pick, no search), ``EXHAUSTIVE``
    (times every algorithm on the first run of each new input shape: a new batch size pays it on
    its first request) or ``DEFAULT``. See docs/BENCHMARKS.md for what each costs and gains."""
    cuda_tf32: bool = False
    """Let cuDNN and cuBLAS use TF32 for float32 math: faster on Ampere and later, but answers
    move by about 1e-3 from the exported models' (off keeps the 1e-4 export parity)."""
    cuda_mem_limit_mb: int = 0
    """Cap on each session's CUDA memory arena in MiB (0 = no cap)."""
    cuda_arena_extend_strategy: str = "kSameAsRequested"
    """How the CUDA arena grows: ``kSameAsRequested`` (holds what was asked for) or
    ``kNextPowerOfTwo`` (onnxruntime's default: fewer, bigger, extensions)."""
    max_batch_size: int = 0
    """Override every model's max batch size (0 keeps each config's value)."""
    max_queue_delay_ms: float = 2.0
    """How long a batch may wait for more items, once the model is busy. A lone caller never waits."""
    max_queue_size: int = 512
    """Items a model's (or a pipeline's) batch queue holds; callers beyond it wait for room (at most until their
    deadline). Bounds the memory of decoded inputs and the queueing delay, never refuses."""
    queue_delay_target_ms: float = 0.0
    """Opt-in queue-time shedding: when > 0, new work that could not start within about this long is
    refused at once (RESOURCE_EXHAUSTED with a ``grpc-retry-pushback-ms`` trailer) once the wait has
    stood over it for 100 ms. Off by default: it cannot tell an open loop's standing queue from a closed
    loop's, and refused closed loops of 128 callers at 50 ms; the caller's deadline sheds instead (a call
    that cannot be answered before its deadline is refused at once). See docs/RELIABILITY.md#overload-control."""
    max_pipeline_items: int = 512
    """Items a pipeline admits at once, decoding included; calls beyond it wait for room (at most until
    their deadline), unary calls and stream requests alike."""
    max_connection_age_s: float = 0.0
    """Close each client connection gracefully after this long (0 = never), so clients re-resolve
    DNS and spread over replicas added since (Kubernetes scale-ups)."""
    max_connection_age_grace_s: float = 10.0
    """Time in-flight calls get on a connection closed for its age."""
    max_concurrent_rpcs: int = 4096
    """Calls to fusionserve's services in flight at once per process (health and reflection not
    counted). Beyond it a call is refused at once with RESOURCE_EXHAUSTED and a pushback: the only
    bound that refuses for lack of room, so a closed loop of up to this many callers is always answered."""
    max_pending_rpcs: int = 20_000
    """Calls gRPC holds before the event loop takes them up (its accept queue). gRPC answers an overflow
    of it CANCELLED, a code that tells a caller nothing, so it is set far above any queue the loop falls
    behind by: a closed loop never has more calls out than callers, and under an open-loop flood the
    callers' deadlines end calls there (gRPC drops a cancelled call before the loop sees it).
    See docs/RELIABILITY.md#overload-control."""
    intra_op_threads: int = 1
    """onnxruntime intra-op threads per session (0 = onnxruntime's default: all cores)."""
    inter_op_threads: int = 1
    """onnxruntime inter-op threads per session."""
    graph_optimization_level: str = "all"
    """onnxruntime graph optimisation: ``disable``, ``basic``, ``extended`` or ``all``."""
    io_binding: bool = True
    """On CUDA, run through an onnxruntime I/O binding (host inputs and outputs bound to the call)."""
    embedding_cache_mb: float = 64.0
    """Memory for the per-modality embedding cache (encoder outputs by model version and input),
    in MiB; 0 turns it off. See docs/BENCHMARKS.md for what it saves on repeated inputs."""
    preprocess_threads: int = 2
    """Threads that run pipeline batches: decoding, resizing, the models (OpenCV and onnxruntime release the GIL)."""
    version_policy: Any = "latest"
    """``latest``, ``all`` or a list of versions; per model in ``model_version_policy``."""
    model_version_policy: dict[str, Any] = field(default_factory=dict)
    """Per-model version policy, e.g. ``{"fusion": [1, 2]}``."""
    max_message_bytes: int = 64 * 1024 * 1024
    """Largest gRPC message accepted or sent."""
    max_image_bytes: int = 16 * 1024 * 1024
    """Largest encoded image accepted."""
    max_image_pixels: int = 40_000_000
    """Largest decoded image (width × height), checked from the header before decoding."""
    max_text_chars: int = 10_000
    """Longest text accepted, in characters."""
    max_stream_inflight: int = 64
    """Requests of one stream processed at once; the stream reads no further until one is done."""
    max_concurrent_streams: int = 256
    """Open streams at once; more get RESOURCE_EXHAUSTED."""
    shutdown_grace_s: float = 10.0
    """On SIGTERM: how long in-flight calls may take to finish."""
    drain_delay_s: float = 0.5
    """On SIGTERM, after health goes NOT_SERVING and before gRPC stops accepting calls: time for
    health-checking clients to move away (new calls meanwhile get UNAVAILABLE). Part of the grace."""
    tls_cert: Path | None = None
    """PEM server certificate (chain); with ``tls_key`` the server speaks TLS only."""
    tls_key: Path | None = None
    """PEM private key of ``tls_cert``."""
    tls_client_ca: Path | None = None
    """PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS)."""
    auth_token_file: Path | None = None
    """File of accepted bearer tokens, one per line; when set, calls need ``authorization: Bearer …``."""
    auth_exempt_health: bool = True
    """Leave the health service open without a token (for load balancer and Kubernetes probes)."""
    warmup: bool = True
    """Run each model before marking it ready: one item, and on CUDA also a full batch (so the
    memory arena has grown to its peak and no request pays for that)."""
    log_level: str = "INFO"
    """Python logging level of the server."""
    trace_endpoint: str = ""
    """OpenTelemetry tracing: export spans over OTLP/gRPC to this collector (``http://collector:4317``).
    Unset, tracing is on when the standard OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT
    is set, and off otherwise; service name, sampler and headers come from the standard OTEL_* variables.
    Needs the ``tracing`` extra. See docs/OBSERVABILITY.md."""
    access_log: str = "off"
    """One JSON line per call: ``off``, ``all``, or a share such as ``0.01`` (that share of the calls that
    succeed, and every call that fails). Written by a thread, never by the event loop; lines beyond
    what it keeps up with are dropped and counted. See docs/OBSERVABILITY.md."""
    access_log_file: Path | None = None
    """File the access log is appended to; unset: standard error."""
    access_log_inputs: bool = False
    """Put each item's text and image bytes (base64) in its access log line: off, since they may be
    personal data and images make lines large."""

    def cuda_provider_options(self) -> dict[str, str]:
        """The CUDA execution provider options these settings stand for, as onnxruntime spells them."""
        options = {
            "device_id": str(self.cuda_device_id),
            "cudnn_conv_algo_search": self.cuda_conv_algo_search,
            "use_tf32": "1" if self.cuda_tf32 else "0",
            "arena_extend_strategy": self.cuda_arena_extend_strategy,
        }
        if self.cuda_mem_limit_mb > 0:
            options["gpu_mem_limit"] = str(self.cuda_mem_limit_mb * 1024 * 1024)
        return options

    @classmethod
    def field_names(cls) -> list[str]:
        """Names of every setting."""
        return [f.name for f in fields(cls)]

    def updated(self, values: Mapping[str, Any]) -> ServerSettings:
        """A copy with ``values`` applied (None values are ignored), converted to each field's type."""
        known = {f.name: f for f in fields(self)}
        changes = {}
        for key, value in values.items():
            if value is None:
                continue
            if key not in known:
                raise ValueError(f"unknown setting {key!r}; known: {', '.join(sorted(known))}")
            try:
                changes[key] = _convert(known[key], value)
            except ValueError as e:
                raise ValueError(
                    f"setting {key} (flag --{key.replace('_', '-')}, variable {ENV_PREFIX}{key.upper()}): "
                    f"cannot use {value!r}: {e}"
                ) from e
        return dataclasses.replace(self, **changes)

    @classmethod
    def load(
        cls,
        config_file: Path | None = None,
        env: Mapping[str, str] | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> ServerSettings:
        """Defaults, then the JSON config file, then ``FUSIONSERVE_*`` variables, then overrides."""
        settings = cls()
        if config_file is not None:
            try:
                data = json.loads(Path(config_file).read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"config file {str(config_file)!r}: {e}") from e
            if not isinstance(data, dict):
                raise ValueError(f"config file {str(config_file)!r} must hold a JSON object")
            settings = settings.updated(data)
        env = os.environ if env is None else env
        names = set(cls.field_names())
        # Unknown FUSIONSERVE_* variables (Kubernetes service links, say) are ignored, not fatal.
        from_env = {
            k[len(ENV_PREFIX) :].lower(): v
            for k, v in env.items()
            if k.startswith(ENV_PREFIX) and k[len(ENV_PREFIX) :].lower() in names
        }
        settings = settings.updated(from_env)
        settings = settings.updated(overrides or {})
        settings.validate()
        return settings

    def validate(self) -> None:
        """Raise ValueError naming the first setting that makes no sense."""
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, not {self.device!r}")
        if self.graph_optimization_level not in ("disable", "basic", "extended", "all"):
            raise ValueError("graph_optimization_level must be disable, basic, extended or all")
        if self.model_control_mode not in ("none", "poll", "explicit"):
            raise ValueError(f"model_control_mode must be none, poll or explicit, not {self.model_control_mode!r}")
        if self.repository_poll_secs <= 0:
            raise ValueError("repository_poll_secs must be > 0")
        if self.cuda_conv_algo_search not in ("HEURISTIC", "EXHAUSTIVE", "DEFAULT"):
            raise ValueError("cuda_conv_algo_search must be HEURISTIC, EXHAUSTIVE or DEFAULT")
        if self.cuda_arena_extend_strategy not in ("kSameAsRequested", "kNextPowerOfTwo"):
            raise ValueError("cuda_arena_extend_strategy must be kSameAsRequested or kNextPowerOfTwo")
        if self.workers != "auto" and (isinstance(self.workers, bool) or not isinstance(self.workers, int)
                                        or self.workers < 1):
            raise ValueError(f"workers must be a whole number >= 1 or 'auto', not {self.workers!r}")
        if self.model_control_mode == "explicit" and self.workers != 1 and self.workers != "auto":
            raise ValueError(f"workers {self.workers} needs model_control_mode poll or none: "
                             "explicit load/unload calls would reach one worker only")  # fmt: skip
        if self.queue_delay_target_ms < 0:
            raise ValueError("queue_delay_target_ms must be >= 0 (0 turns overload control off)")
        if self.embedding_cache_mb < 0:
            raise ValueError("embedding_cache_mb must be >= 0 (0 turns the cache off)")
        if self.cuda_mem_limit_mb < 0 or self.cuda_device_id < 0:
            raise ValueError("cuda_mem_limit_mb and cuda_device_id must be >= 0")
        for name in ("max_queue_size", "max_pipeline_items", "max_concurrent_rpcs", "max_pending_rpcs",
                     "max_message_bytes",
                     "max_image_bytes", "max_image_pixels",
                     "max_text_chars", "max_stream_inflight", "max_concurrent_streams", "preprocess_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")  # fmt: skip
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        if self.max_batch_size < 0 or self.max_queue_delay_ms < 0 or self.shutdown_grace_s < 0:
            raise ValueError("max_batch_size, max_queue_delay_ms and shutdown_grace_s must be >= 0")
        from fusionserve.server.access_log import share_logged

        share_logged(self.access_log)  # raises ValueError on anything but off, all or a share


def _convert(f: dataclasses.Field, value: Any) -> Any:
    kind = str(f.type)
    if isinstance(value, str):
        if "bool" in kind:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"setting {f.name}: expected true/false, got {value!r}")
        if kind == "int":
            return int(value)
        if kind == "int | str":  # a count or a word (workers: 4 or auto)
            return int(value) if value.strip().isdigit() else value.strip()
        if kind == "float":
            return float(value)
        if kind in ("Path", "Path | None"):
            return Path(value) if value else None
        if kind.startswith(("dict", "Any")) and value[:1] in "[{":
            return json.loads(value)
        return value
    if kind in ("Path", "Path | None"):
        return Path(value)
    if kind == "float" and isinstance(value, int):
        return float(value)
    return value

"""``fusionserve loadtest``: closed- and open-loop load on the typed or the V2 (KServe) API.

One asyncio loop drives every request (grpc.aio, pre-serialised requests, responses left
unparsed on unary calls), so one process sends thousands of requests per second.

- **Closed loop** (``concurrency``): C workers, each sending its next request when the last is
  answered. Latency runs from each send.
- **Open loop** (``rate``): requests are *intended* at a constant rate whatever the server does,
  and latency runs from each request's intended send time. A server that stalls cannot hide
  behind coordinated omission: requests that could not even be sent during the stall are charged
  the time they waited. ``service_latency_ms`` (from the actual send) is reported beside it.

Throughput counts OK responses that arrived inside the measured window (after the warm-up);
latency figures cover the OK requests intended inside it; errors are counted by status code.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import os
import platform
import sys
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from fusionserve.client.channel import TLSConfig, create_channel
from fusionserve.client.inputs import load_inputs, sample
from fusionserve.v1 import fusion_pb2 as pb
from fusionserve.v2_codec import serialize_bytes

logger = logging.getLogger(__name__)

CLASSIFY = "/fusionserve.v1.FusionService/Classify"
CLASSIFY_STREAM = "/fusionserve.v1.FusionService/ClassifyStream"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
MODEL_STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"
PERCENTILES = (50.0, 90.0, 99.0, 99.9)
IN_BAND_ERROR = "IN_BAND_ERROR"
"""Code recorded for a V2 stream ``error_message`` that does not start with a status code name."""

LATE_SEND_WARNING_MS = 5.0
"""Open loop: the summary notes a send lag p99 above this."""

clock = time.perf_counter


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


# ---- requests ---------------------------------------------------------------------------------------
def typed_request(items: Sequence[tuple[bytes, str]], model: str) -> bytes:
    """A serialised ``ClassifyRequest``."""
    request = pb.ClassifyRequest(items=[pb.Item(image=i, text=t) for i, t in items], model=model)
    return request.SerializeToString()


def v2_request(items: Sequence[tuple[bytes, str]], model: str) -> bytes:
    """A serialised ``ModelInferRequest`` with BYTES inputs IMAGE and TEXT of shape ``[B]``."""
    from fusionserve.v2 import grpc_service_pb2 as v2

    request = v2.ModelInferRequest(model_name=model)
    for name in ("IMAGE", "TEXT"):
        request.inputs.add(name=name, datatype="BYTES", shape=[len(items)])
    request.raw_input_contents.append(serialize_bytes([i for i, _ in items]))
    request.raw_input_contents.append(serialize_bytes([t for _, t in items]))
    return request.SerializeToString()


def _with_id(api: str) -> Callable[[bytes, str], bytes]:
    """A function appending an id to a serialised request.

    Protobuf merges concatenated messages, so the body is serialised once and each request adds
    only its few id bytes.
    """
    if api == "typed":
        return lambda body, rid: body + pb.ClassifyRequest(request_id=rid).SerializeToString()
    from fusionserve.v2 import grpc_service_pb2 as v2

    return lambda body, rid: body + v2.ModelInferRequest(id=rid).SerializeToString()


def _typed_stream_reply(data: bytes) -> tuple[str, str]:
    r = pb.ClassifyResponse.FromString(data)
    if r.error.code:
        return r.request_id, r.error.code
    for result in r.results:
        if result.error.code:
            return r.request_id, result.error.code
    return r.request_id, "OK"


def _v2_stream_reply(data: bytes) -> tuple[str, str]:
    from fusionserve.v2 import grpc_service_pb2 as v2

    r = v2.ModelStreamInferResponse.FromString(data)
    if not r.error_message:
        return r.infer_response.id, "OK"
    code = r.error_message.partition(":")[0]  # fusionserve writes "CODE: message"
    return r.infer_response.id, code if code in grpc.StatusCode.__members__ else IN_BAND_ERROR


# ---- callers: one request → its status code name -----------------------------------------------
class _UnaryCaller:
    def __init__(self, channels: list[grpc.aio.Channel], method: str, payloads: list[bytes], s: LoadSettings, md):
        self._calls = [ch.unary_unary(method) for ch in channels]  # bytes in, bytes out
        self._payloads = payloads
        self._timeout_s = s.timeout_s
        self._metadata = md

    async def __call__(self, n: int, lane: int) -> str:
        call = self._calls[lane % len(self._calls)]
        try:
            await call(self._payloads[n % len(self._payloads)], timeout=self._timeout_s, metadata=self._metadata)
        except grpc.aio.AioRpcError as e:
            return e.code().name
        return "OK"


class _Stream:
    """One open bidirectional stream; waiters are futures keyed by request id."""

    def __init__(self, channel: grpc.aio.Channel, method: str, parse: Callable[[bytes], tuple[str, str]], md):
        self.call = channel.stream_stream(method)(metadata=md)
        self.waiting: dict[str, asyncio.Future[str]] = {}
        self.lock = asyncio.Lock()  # one write at a time per call
        self.closed = False
        self._parse = parse
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        end = "UNAVAILABLE"  # the server closed a stream we had not closed
        try:
            while (data := await self.call.read()) is not grpc.aio.EOF:
                rid, code = self._parse(data)
                future = self.waiting.pop(rid, None)
                if future is None and not rid and self.waiting:  # no id in an error reply: oldest waiter
                    future = self.waiting.pop(next(iter(self.waiting)))
                if future is not None and not future.done():
                    future.set_result(code)
        except grpc.aio.AioRpcError as e:
            end = e.code().name
        except asyncio.CancelledError:
            end = "CANCELLED"
            raise
        finally:
            self.closed = True
            for future in self.waiting.values():
                if not future.done():
                    future.set_result(end)
            self.waiting.clear()

    async def close(self) -> None:
        self.closed = True
        try:
            async with self.lock:
                await self.call.done_writing()
            await asyncio.wait_for(asyncio.shield(self.reader), 5)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, asyncio.TimeoutError):
            pass
        finally:
            self.call.cancel()
            self.reader.cancel()


class _StreamCaller:
    def __init__(self, channels: list[grpc.aio.Channel], method: str, payloads: list[bytes], s: LoadSettings, md):
        self._channels = channels
        self._method = method
        self._payloads = payloads
        self._timeout_s = s.timeout_s
        self._metadata = md
        self._with_id = _with_id(s.api)
        self._parse = _typed_stream_reply if s.api == "typed" else _v2_stream_reply
        n = s.streams or (4 if s.open_loop else s.concurrency)
        self._streams: list[_Stream | None] = [None] * n

    def _stream(self, lane: int) -> _Stream:
        slot = lane % len(self._streams)
        stream = self._streams[slot]
        if stream is None or stream.closed:  # a broken stream is replaced for the next request
            stream = _Stream(self._channels[slot % len(self._channels)], self._method, self._parse, self._metadata)
            self._streams[slot] = stream
        return stream

    async def __call__(self, n: int, lane: int) -> str:
        stream = self._stream(lane)
        rid = str(n)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[str] = loop.create_future()
        stream.waiting[rid] = future
        timer = loop.call_later(self._timeout_s, _expire, future)
        try:
            async with stream.lock:
                await stream.call.write(self._with_id(self._payloads[n % len(self._payloads)], rid))
            return await future
        except grpc.aio.AioRpcError as e:
            return e.code().name
        except asyncio.InvalidStateError:
            return "UNAVAILABLE"
        finally:
            timer.cancel()
            stream.waiting.pop(rid, None)

    async def aclose(self) -> None:
        await asyncio.gather(*(s.close() for s in self._streams if s is not None), return_exceptions=True)


def _expire(future: asyncio.Future[str]) -> None:
    if not future.done():
        future.set_result("DEADLINE_EXCEEDED")


# ---- recording ------------------------------------------------------------------------------------
class _Recorder:
    """Every request's intended and actual send time, completion time and status code."""

    def __init__(self) -> None:
        self.intended = array("d")
        self.sent = array("d")
        self.done = array("d")
        self.code = array("H")
        self.codes: dict[str, int] = {"OK": 0}
        self.inflight = 0
        self.errors = 0
        self.tick: list[float] = []  # latencies since the last progress line

    def add(self, intended: float, sent: float, done: float, code: str) -> None:
        self.intended.append(intended)
        self.sent.append(sent)
        self.done.append(done)
        index = self.codes.get(code)
        if index is None:
            index = self.codes[code] = len(self.codes)
        self.code.append(index)
        if index:
            self.errors += 1
        self.tick.append(done - intended)


async def _closed_loop(caller: Any, s: LoadSettings, rec: _Recorder, t_end: float) -> None:
    numbers = itertools.count()

    async def worker(lane: int) -> None:
        while (start := clock()) < t_end:
            rec.inflight += 1
            code = await caller(next(numbers), lane)
            rec.inflight -= 1
            rec.add(start, start, clock(), code)

    await asyncio.gather(*(worker(w) for w in range(s.concurrency)))


async def _open_loop(caller: Any, s: LoadSettings, rec: _Recorder, t0: float, t_end: float) -> None:
    assert s.rate is not None
    interval = 1.0 / s.rate
    slots = asyncio.Semaphore(s.max_inflight)
    tasks: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()

    async def fire(n: int, intended: float) -> None:
        sent = clock()
        rec.inflight += 1
        try:
            code = await caller(n, n)
        finally:
            rec.inflight -= 1
            slots.release()
        rec.add(intended, sent, clock(), code)

    for n in itertools.count():
        intended = t0 + n * interval
        if intended >= t_end:
            break
        delay = intended - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        await slots.acquire()  # at max_inflight, wait: the wait is charged to the request
        task = loop.create_task(fire(n, intended))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)


async def _progress(rec: _Recorder, t0: float, measure_from: float, t_end: float) -> None:
    tty = sys.stderr.isatty()
    last = clock()
    while True:
        await asyncio.sleep(1.0)
        now = clock()
        tick, rec.tick = rec.tick, []
        middle = (last + now) / 2  # the second this line describes
        phase = "warm-up" if middle < measure_from else ("measuring" if middle < t_end else "draining")
        line = f"[{now - t0:6.1f}s] {phase:<9} {len(tick) / (now - last):9.1f} req/s"
        if tick:
            tick.sort()
            line += f"  p50 {_nearest_rank(tick, 50) * 1e3:8.2f} ms  p99 {_nearest_rank(tick, 99) * 1e3:8.2f} ms"
        line += f"  in flight {rec.inflight:5d}  errors {rec.errors}"
        print(("\r" + line) if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)
        last = now


def _nearest_rank(sorted_values: Sequence[float] | np.ndarray, p: float) -> float:
    n = len(sorted_values)
    return float(sorted_values[min(n - 1, max(0, math.ceil(p / 100.0 * n) - 1))])


async def run_load(s: LoadSettings, inputs: Sequence[tuple[bytes, str]] | None = None) -> LoadReport:
    """Run the load test and return its report.

    Args:
        s: the settings.
        inputs: (image bytes, text) pairs; default: from ``s.inputs``.
    """
    s.validate()
    if inputs is None:
        inputs = load_inputs(s.inputs, n=max(64, s.batch_size))
    build = typed_request if s.api == "typed" else v2_request
    payloads = [build(sample(inputs, k * s.batch_size, s.batch_size), s.model) for k in range(len(inputs))]
    md = (("authorization", f"Bearer {s.token}"),) if s.token else None
    channels = [
        create_channel(s.target, tls=s.tls, retries=False, health_check=False, separate_connection=True)
        for _ in range(s.connections)
    ]  # no retries: the load test counts failures, it does not hide them
    caller: _UnaryCaller | _StreamCaller
    if s.mode == "unary":
        caller = _UnaryCaller(channels, CLASSIFY if s.api == "typed" else MODEL_INFER, payloads, s, md)
    else:
        caller = _StreamCaller(channels, CLASSIFY_STREAM if s.api == "typed" else MODEL_STREAM_INFER, payloads, s, md)
    try:
        for ch in channels:
            try:
                await asyncio.wait_for(ch.channel_ready(), s.timeout_s)
            except asyncio.TimeoutError:
                raise ConnectionError(f"cannot connect to {', '.join(s.target)} within {s.timeout_s:g}s") from None
        rec = _Recorder()
        started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        t0 = clock()
        measure_from, t_end = t0 + s.warmup_s, t0 + s.warmup_s + s.duration_s
        loop = asyncio.get_running_loop()
        progress = loop.create_task(_progress(rec, t0, measure_from, t_end)) if s.progress else None
        try:
            if s.open_loop:
                await _open_loop(caller, s, rec, t0, t_end)
            else:
                await _closed_loop(caller, s, rec, t_end)
        finally:
            if progress is not None:
                progress.cancel()
                if sys.stderr.isatty():
                    print(file=sys.stderr)
            if isinstance(caller, _StreamCaller):
                await caller.aclose()
        return LoadReport.build(s, rec, t0, measure_from, t_end, started_at)
    finally:
        for ch in channels:
            await ch.close()


def run(s: LoadSettings, inputs: Sequence[tuple[bytes, str]] | None = None) -> LoadReport:
    """Blocking :func:`run_load` (runs its own event loop)."""
    return asyncio.run(run_load(s, inputs))


# ---- the report -----------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    """Where the load generator ran."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from fusionserve import __version__

    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "grpcio": grpc.__version__,
        "fusionserve": __version__,
    }


def _stats_ms(sorted_s: np.ndarray) -> dict[str, float]:
    if not len(sorted_s):
        return {}
    ms = sorted_s * 1e3
    out = {"min": float(ms[0]), "mean": float(ms.mean()), "stdev": float(ms.std())}
    for p in PERCENTILES:
        out[f"p{p:g}"] = _nearest_rank(ms, p)
    out["max"] = float(ms[-1])
    return out


@dataclass
class LoadReport:
    """The figures of one run; ``to_json()`` is what ``--json`` writes."""

    settings: LoadSettings
    machine: dict[str, Any]
    started_at: str
    results: dict[str, Any]
    timeline: list[dict[str, Any]]
    samples: dict[str, np.ndarray] = field(repr=False)
    """Measured requests: ``t_s`` (intended, from the window start), ``latency_s``, ``ok``."""

    @classmethod
    def build(
        cls, s: LoadSettings, rec: _Recorder, t0: float, measure_from: float, t_end: float, started_at: str
    ) -> LoadReport:
        """The figures from a recorder (times from ``clock()``)."""
        intended = np.frombuffer(rec.intended, np.float64)
        sent = np.frombuffer(rec.sent, np.float64)
        done = np.frombuffer(rec.done, np.float64)
        code = np.frombuffer(rec.code, np.uint16)
        names = {i: c for c, i in rec.codes.items()}
        measured = intended >= measure_from
        ok = code == 0
        latency = done - intended
        keep = measured & ok
        answered_in_window = int(np.count_nonzero(ok & (done >= measure_from) & (done < t_end)))
        errors: dict[str, int] = {}
        for index, count in zip(*np.unique(code[measured & ~ok], return_counts=True), strict=True):
            errors[names[int(index)]] = int(count)
        lat_sorted = np.sort(latency[keep])
        results: dict[str, Any] = {
            "requests": int(np.count_nonzero(measured)),
            "requests_with_warmup": len(intended),
            "ok": int(np.count_nonzero(keep)),
            "errors": errors,
            "error_count": sum(errors.values()),
            "duration_s": s.duration_s,
            "requests_per_s": answered_in_window / s.duration_s,
            "items_per_s": answered_in_window * s.batch_size / s.duration_s,
            "latency_ms": _stats_ms(lat_sorted),
        }
        if s.open_loop:
            results["offered_rate"] = s.rate
            results["service_latency_ms"] = _stats_ms(np.sort((done - sent)[keep]))
            lag = np.sort((sent - intended)[measured])
            results["send_lag_ms"] = {k: v for k, v in _stats_ms(lag).items() if k in ("p50", "p99", "max")}
        results["histogram"] = _histogram(lat_sorted)
        t = intended[measured] - measure_from
        timeline = []
        m_lat, m_ok = latency[measured], ok[measured]
        for second in range(math.ceil(s.duration_s)):
            sel = (t >= second) & (t < second + 1)
            good = np.sort(m_lat[sel & m_ok])
            row: dict[str, Any] = {
                "t_s": second,
                "requests": int(np.count_nonzero(sel)),
                "errors": int(np.count_nonzero(sel & ~m_ok)),
            }
            if len(good):
                row.update(p50_ms=_nearest_rank(good, 50) * 1e3, p99_ms=_nearest_rank(good, 99) * 1e3,
                           max_ms=float(good[-1]) * 1e3)  # fmt: skip
            timeline.append(row)
        samples = {"t_s": t, "latency_s": m_lat, "ok": m_ok}
        return cls(s, machine_info(), started_at, results, timeline, samples)

    def to_json(self) -> dict[str, Any]:
        """The JSON report: settings, machine, figures and a per-second timeline."""
        return {
            "report": "fusionserve-loadtest/1",
            "started_at": self.started_at,
            "settings": self.settings.to_json(),
            "machine": self.machine,
            "results": self.results,
            "timeline": self.timeline,
        }

    def summary(self) -> str:
        """A human summary, laid out like ghz's."""
        s, r = self.settings, self.results
        loop = f"open loop at {s.rate:g} req/s" if s.open_loop else f"closed loop, concurrency {s.concurrency}"
        lines = [
            "Summary:",
            f"  Target:       {', '.join(s.target)}",
            f"  Load:         {s.api} API, {s.mode}, {loop}, batch {s.batch_size}",
            f"  Count:        {r['requests']}",
            f"  Duration:     {s.duration_s:.2f} s (after {s.warmup_s:g} s warm-up)",
            f"  Requests/s:   {r['requests_per_s']:.1f}",
            f"  Items/s:      {r['items_per_s']:.1f}",
            f"  Errors:       {r['error_count']} ({100.0 * r['error_count'] / max(1, r['requests']):.2f}%)",
            "",
        ]
        lat = r["latency_ms"]
        if lat:
            origin = "intended send time" if s.open_loop else "send"
            keys = ["min", "mean", "p50", "p90", "p99", "p99.9", "max"]
            lines += [f"Latency (ms, from the {origin}):", "  " + "".join(f"{k:>10}" for k in keys),
                      "  " + "".join(f"{lat[k]:>10.2f}" for k in keys)]  # fmt: skip
            if s.open_loop:
                svc, lag = r["service_latency_ms"], r["send_lag_ms"]
                lines.append(f"  service time (from the actual send): p50 {svc['p50']:.2f}  p99 {svc['p99']:.2f}  "
                             f"max {svc['max']:.2f};  send lag p99 {lag['p99']:.2f}  max {lag['max']:.2f}")  # fmt: skip
                if lag["p99"] > LATE_SEND_WARNING_MS:
                    lines.append(
                        f"  note: 1% of requests were sent over {lag['p99']:.1f} ms late (--max-inflight was reached, "
                        "or the generator fell behind); that wait is in the latency"
                    )
            lines += ["", "Response time histogram (ms):"]
            hist = r["histogram"]
            top = max(b["count"] for b in hist) or 1
            for b in hist:
                lines.append(f"  {b['le_ms']:10.3f} [{b['count']:>7}] |{'#' * round(40 * b['count'] / top)}")
            lines += ["", "Latency distribution:"]
            lines += [f"  {p:>5g} % in {lat[f'p{p:g}']:.2f} ms" for p in PERCENTILES]
        lines += ["", "Status code distribution:", f"  [OK]   {r['ok']} responses"]
        lines += [f"  [{code}]   {count} responses" for code, count in sorted(r["errors"].items())]
        return "\n".join(lines)

    def write_json(self, path: str | Path) -> None:
        """Write :meth:`to_json` to a file."""
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")

    def plot(self, path: str | Path) -> None:
        """A PNG: latency over time (every request, per-second p50/p99), throughput, histogram."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazily: only --plot needs it
        from matplotlib.figure import Figure
        from matplotlib.ticker import ScalarFormatter

        t, latency_ms, ok = self.samples["t_s"], self.samples["latency_s"] * 1e3, self.samples["ok"]
        fig = Figure(figsize=(11, 9), layout="constrained")
        FigureCanvasAgg(fig)
        ax_time, ax_rate, ax_hist = fig.subplots(3, 1, height_ratios=[3, 1, 2])
        s = self.settings
        fig.suptitle(
            f"fusionserve loadtest — {s.api} {s.mode}, "
            + (f"open loop {s.rate:g} req/s" if s.open_loop else f"closed loop c={s.concurrency}")
            + f", batch {s.batch_size}"
        )
        step = max(1, len(t) // 50_000)  # keep the scatter readable and the file small
        ax_time.scatter(t[ok][::step], latency_ms[ok][::step], s=2, alpha=0.3, label="request")
        if np.any(~ok):
            ax_time.scatter(t[~ok], latency_ms[~ok], s=8, marker="x", color="red", label="error")
        rows = [row for row in self.timeline if "p50_ms" in row]
        if rows:
            starts = np.array([row["t_s"] for row in rows], float)
            for key, colour in (("p50_ms", "black"), ("p99_ms", "orange")):
                ax_time.hlines([row[key] for row in rows], starts, starts + 1, colors=colour,
                               label=f"{key[:-3]} per second")  # fmt: skip
        if len(t) and np.any(latency_ms > 0):
            ax_time.set_yscale("log")
            ax_time.yaxis.set_major_formatter(ScalarFormatter())
        ax_time.set_xlabel("intended send time (s from the start of the measurement)")
        ax_time.set_ylabel("latency (ms)")
        ax_time.legend(loc="upper right", fontsize="small")
        ax_rate.bar([row["t_s"] + 0.5 for row in self.timeline], [row["requests"] for row in self.timeline], width=0.9)
        ax_rate.set_ylabel("requests per second")
        ax_rate.set_xlabel("s")
        good = latency_ms[ok]
        if len(good):
            low, high = max(float(good.min()), 1e-3), max(float(good.max()), 2e-3)
            bins = np.geomspace(low, high * 1.0001, 60) if high > low else 10
            ax_hist.hist(good, bins=bins)
            ax_hist.set_xscale("log")
            ax_hist.xaxis.set_major_formatter(ScalarFormatter())
            for p, colour in zip(("p50", "p99", "p99.9"), ("black", "orange", "red"), strict=True):
                value = self.results["latency_ms"][p]
                ax_hist.axvline(value, color=colour, linestyle="--", label=f"{p} {value:.2f} ms")
            ax_hist.legend(fontsize="small")
        ax_hist.set_xlabel("latency (ms)")
        ax_hist.set_ylabel("requests")
        fig.savefig(path, dpi=100)


def _histogram(sorted_s: np.ndarray, buckets: int = 10) -> list[dict[str, Any]]:
    """ghz-style: ``buckets`` equal-width buckets from the fastest to the slowest (upper edges, ms)."""
    if not len(sorted_s):
        return []
    ms = sorted_s * 1e3
    edges = np.linspace(ms[0], ms[-1], buckets + 1)
    counts = np.histogram(ms, bins=edges)[0] if ms[-1] > ms[0] else np.array([len(ms)] + [0] * (buckets - 1))
    return [{"le_ms": float(e), "count": int(c)} for e, c in zip(edges[1:], counts, strict=True)]

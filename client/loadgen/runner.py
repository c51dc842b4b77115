"""Run a load test: build the requests, open the channels, drive a loop, return its report."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from datetime import datetime, timezone

from fusionserve.client.channel import create_channel
from fusionserve.client.inputs import load_inputs, sample
from fusionserve.client.loadgen.callers import StreamCaller, UnaryCaller
from fusionserve.client.loadgen.loops import Recorder, clock, closed_loop, open_loop, progress
from fusionserve.client.loadgen.report import LoadReport
from fusionserve.client.loadgen.requests import (
    CLASSIFY,
    CLASSIFY_STREAM,
    MODEL_INFER,
    MODEL_STREAM_INFER,
    typed_request,
    v2_request,
)
from fusionserve.client.loadgen.settings import LoadSettings

CONNECT_TIMEOUT_S = 10.0
"""How long the load generator waits for its connections before the load starts (at least)."""


async def run_load(
    s: LoadSettings, inputs: Sequence[tuple[bytes, str]] | None = None, *, payloads: Sequence[bytes] | None = None
) -> LoadReport:
    """Run the load test and return its report.

    Args:
        s: the settings.
        inputs: (image bytes, text) pairs for the pipeline ``s.model``; default: from ``s.inputs``.
        payloads: instead of ``inputs``, requests serialised by the caller (a V2 ``ModelInferRequest``
            for a tensor model, say), sent in turn; ``s.batch_size`` should say how many items each holds.
    """
    s.validate()
    if payloads is None:
        if inputs is None:
            inputs = load_inputs(s.inputs, n=max(64, s.batch_size))
        build = typed_request if s.api == "typed" else v2_request
        payloads = [build(sample(inputs, k * s.batch_size, s.batch_size), s.model) for k in range(len(inputs))]
    payloads = list(payloads)
    md = (("authorization", f"Bearer {s.token}"),) if s.token else None
    channels = [
        create_channel(s.target, tls=s.tls, retries=False, health_check=False, separate_connection=True)
        for _ in range(s.connections)
    ]  # no retries: the load test counts failures, it does not hide them
    caller: UnaryCaller | StreamCaller
    if s.mode == "unary":
        caller = UnaryCaller(channels, CLASSIFY if s.api == "typed" else MODEL_INFER, payloads, s, md)
    else:
        caller = StreamCaller(channels, CLASSIFY_STREAM if s.api == "typed" else MODEL_STREAM_INFER, payloads, s, md)
    try:
        # Connecting is not a call: a 100 ms call deadline must not become a 100 ms connect timeout.
        connect_s = max(s.timeout_s, CONNECT_TIMEOUT_S)
        for ch in channels:
            try:
                await asyncio.wait_for(ch.channel_ready(), connect_s)
            except asyncio.TimeoutError:
                raise ConnectionError(f"cannot connect to {', '.join(s.target)} within {connect_s:g}s") from None
        rec = Recorder()
        started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        t0 = clock()
        measure_from, t_end = t0 + s.warmup_s, t0 + s.warmup_s + s.duration_s
        loop = asyncio.get_running_loop()
        ticker = loop.create_task(progress(rec, t0, measure_from, t_end)) if s.progress else None
        try:
            if s.open_loop:
                await open_loop(caller, s, rec, t0, t_end)
            else:
                await closed_loop(caller, s, rec, t_end)
        finally:
            if ticker is not None:
                ticker.cancel()
                if sys.stderr.isatty():
                    print(file=sys.stderr)
            if isinstance(caller, StreamCaller):
                await caller.aclose()
        return LoadReport.build(s, rec, t0, measure_from, t_end, started_at)
    finally:
        for ch in channels:
            await ch.close()


def run(
    s: LoadSettings, inputs: Sequence[tuple[bytes, str]] | None = None, *, payloads: Sequence[bytes] | None = None
) -> LoadReport:
    """Blocking :func:`run_load` (runs its own event loop)."""
    return asyncio.run(run_load(s, inputs, payloads=payloads))

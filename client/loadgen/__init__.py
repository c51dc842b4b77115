"""The load generator behind ``fusionserve loadtest`` and the bench scripts, one job per module.

- ``settings``: what to send, how hard, for how long (:class:`LoadSettings`).
- ``requests``: pre-serialised typed and V2 requests, and reading stream replies.
- ``callers``: one request → its status code name, over unary calls or long-lived streams.
- ``loops``: the closed loop (C workers) and the open loop (a constant intended rate), with progress.
- ``runner``: :func:`run_load` / :func:`run` tie them together and return a :class:`LoadReport`.
- ``report``: the figures, the JSON report and the human summary; ``plot``: the PNG.

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

from fusionserve.client.loadgen.report import LoadReport, machine_info
from fusionserve.client.loadgen.runner import run, run_load
from fusionserve.client.loadgen.settings import LoadSettings

__all__ = ["LoadReport", "LoadSettings", "machine_info", "run", "run_load"]

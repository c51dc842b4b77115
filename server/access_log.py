"""The access log: one JSON line per call, written by a thread, so the event loop never waits on a disk.

A line holds the call's ``time`` (its start, ISO 8601 UTC), ``method``, ``model``, ``version``,
``items``, ``code``, ``duration_ms``, ``queue_ms`` (time its work waited in batch queues), ``peer``,
``trace_id`` (its trace's, or its caller's ``traceparent``'s) and ``stream_item`` (true for one
request of a stream; the stream itself gets a line too, when it ends). Texts and image bytes are
never written unless ``access_log_inputs`` asks (then ``texts``, and ``images`` in base64).

``access_log``: ``off``, ``all``, or a share such as ``0.01``: that share of the calls that succeed,
and every call that fails. The loop only appends a tuple to a bounded queue; the thread formats and
writes, every :data:`FLUSH_S`. When the thread falls :data:`MAX_PENDING` lines behind, new lines
are dropped and counted (``fusionserve_access_log_dropped_total``) instead of memory growing or the
loop waiting.
"""

from __future__ import annotations

import base64
import collections
import datetime
import json
import os
import random
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fusionserve.server.calls import Call

MAX_PENDING = 10_000
"""Lines the writer thread may be behind before new ones are dropped."""
FLUSH_S = 0.1
"""How often the writer thread writes what has come: lines reach the file within about this long."""
WRITE_LINES = 512
"""Lines formatted and written in one system call, at most."""
FIELDS = ("time", "method", "model", "version", "items", "code", "duration_ms", "queue_ms", "peer", "trace_id",
          "stream_item")  # fmt: skip
STDERR = 2


def share_logged(mode: str) -> float:
    """The share of successful calls ``access_log`` asks to log: 0 (``off``), 1 (``all``) or the number given.

    Raises:
        ValueError: anything else.
    """
    word = str(mode).strip().lower()
    if word == "off":
        return 0.0
    if word == "all":
        return 1.0
    try:
        share = float(word)
    except ValueError:
        share = -1.0
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"access_log must be off, all or a share of the calls between 0 and 1, not {mode!r}")
    return share


def _line(values: tuple[Any, ...]) -> str:
    record = dict(zip(FIELDS, values[: len(FIELDS)], strict=True))
    record["time"] = datetime.datetime.fromtimestamp(record["time"], datetime.timezone.utc).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")  # fmt: skip
    texts, images = values[len(FIELDS) :]
    if texts is not None:
        record["texts"] = texts
        record["images"] = [base64.b64encode(image).decode() for image in images]
    return json.dumps(record, ensure_ascii=False) + "\n"


class AccessLog:
    """Writes the lines of :class:`~fusionserve.server.calls.Call` objects to a file or standard error.

    The loop appends each line's values to a deque (no lock, no thread woken); the writer thread wakes
    every ``FLUSH_S``, formats what is there and writes it in one system call. A thread woken for each
    line would take the interpreter's lock from the loop as often.

    Args:
        share: of the successful calls, the share logged (failed calls always are); see :func:`share_logged`.
        path: the file lines are appended to; None: standard error.
        inputs: whether calls keep their texts and images for their lines.
        on_dropped: told of each line dropped because the writer fell behind.
        max_pending: lines the writer may be behind before new ones are dropped.
    """

    def __init__(self, share: float, path: Path | None = None, *, inputs: bool = False,
                 on_dropped: Callable[[], None] | None = None, max_pending: int = MAX_PENDING) -> None:  # fmt: skip
        self.share = share
        self.inputs = inputs
        self.dropped = 0
        self._on_dropped = on_dropped
        self._max_pending = max_pending
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if path is not None else STDERR
        self._owns_fd = path is not None
        self._pending: collections.deque[tuple[Any, ...]] = collections.deque()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._write_lines, name="access-log", daemon=True)
        self._thread.start()

    def write(self, call: Call) -> None:
        """Queue ``call``'s line, if it is sampled (never blocks)."""
        if call.code == "OK" and self.share < 1.0 and random.random() >= self.share:
            return
        if len(self._pending) >= self._max_pending:
            self.dropped += 1
            if self._on_dropped is not None:
                self._on_dropped()
            return
        self._pending.append((call.wall_time, call.method, call.model, call.version, call.items, call.code,
                              round((call.ended - call.started) * 1e3, 3), round(call.queue_s * 1e3, 3), call.peer,
                              call.trace_id, call.stream_item, call.texts, call.images))  # fmt: skip

    def _write_lines(self) -> None:
        while True:
            stopping = self._stop.wait(FLUSH_S)
            while self._pending:
                count = min(len(self._pending), WRITE_LINES)  # what is there now, a bounded amount at a time
                data = "".join(_line(self._pending.popleft()) for _ in range(count)).encode()
                while data:
                    data = data[os.write(self._fd, data) :]
            if stopping:
                return

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what is queued, then stop the thread (and close the file)."""
        self._stop.set()
        self._thread.join(timeout_s)
        if self._owns_fd:
            os.close(self._fd)
            self._owns_fd = False

"""Where one real-job item's server CPU goes, at 1 caller and at 32: a profile of a running server.

The real job: V2 ``ModelInfer`` on ``multimodal``, one PNG + caption per call, the embedding cache off
(every item decoded and encoded), driven by Triton's perf_analyzer (C++, light on the CPU it shares
with the server; bench/perf_analyzer.py installs it); the server is one ``fusionserve serve`` with its
defaults otherwise. For each caller count:

1. **CPU per item, by thread** (exact, in a window of its own): each server thread's CPU time from
   ``/proc``, grouped by what the thread is (the event loop; the pipeline's batches: decoding and models;
   gRPC core's own threads, which receive and send the calls), divided by the items served.
2. **The event loop's share, by what it was doing** (sampled, in a second window of the same load):
   ``py-spy record --native`` on the server; each sample of the loop's thread is put in the first category whose
   frame it holds (gRPC and protobuf in Python, V2 request decoding, image decoding, tokenising, the
   batchers' hand-offs, the response, metrics, ...), and the loop's exact CPU is split in those
   proportions. Samples of the loop waiting in ``epoll`` are idle time, not CPU. The door's readings
   of gRPC's call count (channelz, server/grpc_counts.py) have a line of their own: their leaf frames
   are gRPC core's. That line is an upper bound: py-spy stops the server for each sample, the loop
   falls behind meanwhile, and the door then reads every ``LAG_READ_S`` instead of every
   ``LAG_INTERVAL_S`` (server/admission.py).
3. **The models' share**: each model's own run time (``fusionserve_compute_time_seconds``) per item.
   A pipeline runs its models in its batch threads (the ``preprocess`` pool, beside decoding); the
   thread's CPU less the models' runs is decoding and assembling the batch.
4. **The pipeline's batch cycle** (same window): how often a batch starts, and what one cycle holds:
   the models' runs, the rest of the batch thread's CPU, and the time left, when the batch thread
   computes nothing (it waits for Python's lock while the loop holds it, for its hand-offs, and for
   the next batch to gather); how long an item waits from its call reaching the pipeline to the
   image encoder's run (queueing, the hand-off and decoding: ``fusionserve_queue_time_seconds``); and
   how long decoding an image took in the batch, by the server's own timers
   (``fusionserve_image_decode_seconds_total`` over ``fusionserve_image_decodes_total``: wall time).
   Set beside the floor (5.), the difference is mostly waiting: OpenCV gives Python's lock up while
   it decodes each image, and taking it back waits while the event loop holds it.
5. **The floor** (once, in this bench process, on one thread in a tight loop): what checking and
   decoding one of perf_analyzer's images costs alone (they are at the model's size: nothing to
   resize). With the models' runs, it is the CPU an item costs before any serving work.

    python bench/cpu_budget.py [--callers 1 32] [--duration-s 8] [--repository REPO] [--smoke]

Prints the idle server's CPU a second (its own timers), then one table per caller count (µs of server
CPU per item, and the share of it; the mean batch of each model); writes
``bench/results/cpu_budget[-smoke].json``. py-spy comes from PyPI (installed into this venv when
missing); it samples 100 times a second, stopping the server for a moment each time, which is why
the profile has a window of its own, after the exact one.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import perf_analyzer as pa
from _common import ServerProcess, machine, repository, result_name, samples, time_calls, write

# What a thread of the server is, from its name: Python's thread name (py-spy reports it), else the
# OS's (gRPC core's own threads have no Python side).
THREAD_GROUPS = (
    ("event loop", ("MainThread",)),
    ("pipeline batches: decoding and the models", ("preprocess",)),
    ("tensor models' runs", ("onnxruntime",)),
    ("gRPC's completion-queue poller (Python)", ("Thread-1 (_poll_wrapper)", "_poll_wrapper")),
    ("asyncio's default executor", ("asyncio_",)),
    ("metrics HTTP server", ("serve_forever",)),
    ("gRPC core", ("grpc", "event_engine", "lifeguard", "default-execut", "resolver")),
)
# What the event loop was doing, by the first of these frames a sample holds (from the leaf up):
# (category, substrings of a frame).
LOOP_CATEGORIES = (
    ("metrics", ("server/metrics.py", "server/model_totals.py", "prometheus_client", "server/tracking.py")),
    ("V2 request decoding", ("decode_inputs", "v2_codec.py", "pipeline_items", "check_request_parameters")),
    ("response building", ("encode_response", "pipeline_outputs", "classify_response", "fill_contents", "to_raw")),
    # By name, not by file: fusionserve/preprocess.py holds the tokeniser too.
    ("image decoding and resizing", ("decode_image", "preprocess_image", "ImagePreprocessing", "check_image_header")),
    ("tokenising", ("Vocabulary", "split_words", "text_to_word_sequence", "pad_tokens", "_filter_table")),
    ("embedding cache", ("embedding_cache.py",)),
    ("onnxruntime on the loop", ("runtime.py", "onnxruntime")),
    ("batchers: queues, batches, hand-offs", ("server/batcher.py", "server/pipeline_batch.py", "server/room.py",
                                              "run_in_executor", "concurrent/futures")),
    ("pipeline and core", ("server/pipeline.py", "server/core.py", "server/admission.py", "server/registry.py")),
    ("servicers and error interceptor", ("server/v2_servicer.py", "server/typed_servicer.py", "server/grpc_errors.py",
                                         "server/call_limit.py", "server/streams.py")),
    ("protobuf (Python side)", ("FromString", "SerializeToString", "google/protobuf", "_message")),
    ("gRPC in Python (cygrpc)", ("cygrpc", "grpc/")),
    ("asyncio: tasks, futures, callbacks", ("asyncio", "_asyncio")),
)
# Work whose leaf frames are another category's (gRPC core's, under cygrpc): a sample is put here when any
# of its frames holds one of these, before the categories above are looked for from the leaf up.
WHOLE_STACK_CATEGORIES = (
    ("the door's reading of gRPC's call count (channelz)", ("server/grpc_counts.py",)),
)
IDLE_FRAMES = ("epoll_wait", "select_epoll_poll")
BATCH_THREADS = THREAD_GROUPS[1][0]  # the pipeline's batch threads
IMAGE_ENCODER = "image_encoder"  # the pipeline's first model in the bench repository: one run per batch
SAMPLES_PER_S = 100
"""py-spy's rate: each sample stops the server for a moment (native stacks need it), so not more."""


def _py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).is_file():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], check=True)
    return found


def _python_thread_names(pid: int) -> dict[int, str]:
    """Native thread id → Python thread name, for the process's Python threads (``py-spy dump``).

    Where py-spy may not attach (a container without ptrace), only the main thread is known: the loop.
    """
    dump = subprocess.run([_py_spy(), "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=60).stdout
    if not dump:
        return {pid: "MainThread"}
    found = re.findall(r'^Thread (\d+) \([^)]*\): "(.*)"$', dump, re.MULTILINE)
    return {int(tid): name for tid, name in found}


def _thread_cpu_s(pid: int) -> dict[int, tuple[str, float]]:
    """Each thread of the process so far: its OS name and CPU seconds, by native thread id."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        out[int(task.name)] = (stat[stat.index("(") + 1 : stat.rindex(")")], (int(fields[11]) + int(fields[12])) / tick)
    return out


def _by_group(threads: dict[int, tuple[str, float]], names: dict[int, str]) -> dict[str, float]:
    """CPU seconds per group of threads (THREAD_GROUPS; else 'other threads'), Python's names first, else the OS's."""
    out: dict[str, float] = collections.defaultdict(float)
    for tid, (os_name, cpu) in threads.items():
        name = names.get(tid) or os_name
        out[next((g for g, prefixes in THREAD_GROUPS if name.startswith(prefixes)), "other threads")] += cpu
    return out


def _category(frames: list[str]) -> str:
    """What one sample of the loop was doing: a whole-stack category, else the first category from the leaf up."""
    for category, keys in WHOLE_STACK_CATEGORIES:
        if any(k in frame for frame in frames for k in keys):
            return category
    for frame in reversed(frames):
        for name, substrings in LOOP_CATEGORIES:
            if any(k in frame for k in substrings):
                return name
    return "other Python"


def _loop_profile(raw: Path, pid: int) -> dict[str, float]:
    """Share of the event loop's busy samples per category (LOOP_CATEGORIES), from py-spy's raw output."""
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        if not frames[0].startswith(f"thread ({pid})"):
            continue  # another thread's sample (the event loop is the main thread)
        if any(idle in frame for frame in frames[-4:] for idle in IDLE_FRAMES):
            continue  # waiting for events: idle
        counts[_category(frames)] += int(n)
    total = sum(counts.values()) or 1
    return {c: n / total for c, n in counts.most_common()}


def _queue_s(server: ServerProcess) -> dict[str, tuple[float, float]]:
    """(seconds waited, calls) so far, per model."""
    return server.histogram("fusionserve_queue_time_seconds")


def _compute_s(server: ServerProcess) -> dict[str, float]:
    return {m: total for m, (total, _) in server.histogram("fusionserve_compute_time_seconds").items()}


def _batches(server: ServerProcess) -> dict[str, tuple[float, float]]:
    """(items, batches) run so far, per model."""
    return server.histogram("fusionserve_batch_size")


def _machine_idle_s() -> float:
    """Seconds all the machine's CPUs have been idle so far (/proc/stat)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return int(fields[4]) / os.sysconf("SC_CLK_TCK")


def idle_cpu_ms_per_s(server: ServerProcess, duration_s: float) -> float:
    """The server's CPU while nobody calls it (its own timers: metrics, the lag watch), ms per second."""
    before = server.cpu_seconds()
    time.sleep(duration_s)
    return (server.cpu_seconds() - before) / duration_s * 1000


def _decoding(server: ServerProcess) -> tuple[float, float]:
    """(seconds, images) the pipeline has spent decoding so far, by its own timers."""
    labels = '{model="multimodal",version="1"}'
    return (server.metric(f"fusionserve_image_decode_seconds_total{labels}"),
            server.metric(f"fusionserve_image_decodes_total{labels}"))  # fmt: skip


def _items(server: ServerProcess) -> float:
    return server.metric('fusionserve_requests_total{api="v2",code="OK",model="multimodal",version="1"}')


def measure(server: ServerProcess, callers: int, duration_s: float, profile: bool, tool: pa.Tool) -> dict[str, Any]:
    """Drive ``callers`` closed-loop callers (perf_analyzer); CPU per item, by thread and (sampled) by task."""
    binary, env, data = tool
    # perf_analyzer runs windows until three agree; with every window accepted (-s 100) and long
    # enough ones, the load lasts past the exact window and the profile that follows it.
    window_ms = int((2 * duration_s + 4) * 1000)
    load = [str(binary), "-m", "multimodal", "-u", server.target, "-i", "grpc", "--concurrency-range",
            f"{callers}:{callers}", "--measurement-interval", str(window_ms), "-s", "100",
            "--input-data", str(data)]  # fmt: skip
    driver = subprocess.Popen(load, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    time.sleep(2.0)  # its warm-up, and the server's
    raw = Path(tempfile.mkdtemp()) / "profile.raw"

    def snapshot() -> tuple[dict[int, tuple[str, float]], float, dict[str, float], dict[str, tuple[float, float]],
                            dict[str, tuple[float, float]], tuple[float, float], float]:  # fmt: skip
        return (_thread_cpu_s(server.pid), _items(server), _compute_s(server), _batches(server), _queue_s(server),
                _decoding(server), time.monotonic())  # fmt: skip

    # First the exact figures, with nothing else looking; then the profile (py-spy stops the server
    # a hundred times a second, which would bend the first).
    threads0, items0, compute0, batches0, queue0, decoding0, wall0 = snapshot()
    idle0, client0 = _machine_idle_s(), server.cpu_seconds(driver.pid)
    time.sleep(duration_s)
    idle1, client1 = _machine_idle_s(), server.cpu_seconds(driver.pid)
    threads1, items1, compute1, batches1, queue1, decoding1, wall1 = snapshot()
    # Named after the window: a thread pool may have started a thread during it.
    names = _python_thread_names(server.pid)
    cpu0, cpu1 = _by_group(threads0, names), _by_group(threads1, names)
    if profile:
        command = [_py_spy(), "record", "--native", "--threads", "--rate", str(SAMPLES_PER_S), "--duration",
                   str(int(duration_s)), "--format", "raw", "--output", str(raw), "--pid", str(server.pid)]  # fmt: skip
        subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=duration_s + 60)
    driver.kill()  # enough load: its own figures are not what this measures
    driver.wait(30)
    items = items1 - items0
    by_thread = {g: (cpu1[g] - cpu0.get(g, 0.0)) / items * 1e6 for g in cpu1}
    row: dict[str, Any] = {"callers": callers, "items": items, "items_per_s": items / (wall1 - wall0),
                           "us_per_item": sum(by_thread.values()), "threads_us_per_item": by_thread}  # fmt: skip
    compute = {m: compute1[m] - compute0.get(m, 0.0) for m in compute1 if compute1[m] > compute0.get(m, 0.0)}
    row["model_runs_us_per_item"] = {m: c / items * 1e6 for m, c in compute.items()}
    runs = {m: (batches1[m][0] - batches0.get(m, (0, 0))[0], batches1[m][1] - batches0.get(m, (0, 0))[1])
            for m in batches1}  # fmt: skip
    row["mean_batch_by_model"] = {m: items / count for m, (items, count) in runs.items() if count}
    thread_s = cpu1.get(BATCH_THREADS, 0.0) - cpu0.get(BATCH_THREADS, 0.0)
    (waited1, calls1), (waited0, calls0) = (q.get(IMAGE_ENCODER, (0.0, 0.0)) for q in (queue1, queue0))
    decoding = (decoding1[0] - decoding0[0], decoding1[1] - decoding0[1])
    row["batch_cycle"] = _batch_cycle(runs, compute, thread_s, (waited1 - waited0, calls1 - calls0), decoding,
                                      wall1 - wall0)  # fmt: skip
    used = {"server": sum(cpu1.values()) - sum(cpu0.values()), "perf_analyzer": client1 - client0,
            "idle": idle1 - idle0}  # fmt: skip
    row["cores"] = {k: seconds / (wall1 - wall0) for k, seconds in used.items()}
    if profile and raw.is_file():
        shares = _loop_profile(raw, server.pid)
        row["event_loop_us_per_item_by_task"] = {c: share * by_thread.get("event loop", 0.0) for c, share in
                                                 shares.items()}  # fmt: skip
    return row


def _batch_cycle(runs: dict[str, tuple[float, float]], compute: dict[str, float], thread_s: float,
                 queued: tuple[float, float], decoding: tuple[float, float],
                 seconds: float) -> dict[str, float]:  # fmt: skip
    """The pipeline's batch cycle in a window of ``seconds`` (see the module docstring); {} when no batch ran.

    ``runs``: (items, batches) per model; ``compute``: each model's run time; ``thread_s``: the batch
    threads' CPU; ``queued``: (seconds waited, calls) before the image encoder's runs; ``decoding``:
    (seconds, images) of the pipeline's decoding; all in the window.
    Each pipeline batch runs each of its models once (every item is computed: the cache is off), so
    the image encoder's runs count the batches.
    """
    items, batches = runs.get(IMAGE_ENCODER, (0.0, 0.0))
    if not batches:
        return {}
    models = sum(compute.values())
    waited, calls = queued
    decode_s, images = decoding
    cycle = seconds / batches
    return {"batches_per_s": batches / seconds, "items_per_batch": items / batches, "cycle_ms": cycle * 1000,
            "models_ms": models / batches * 1000, "batch_thread_other_cpu_ms": (thread_s - models) / batches * 1000,
            "batch_thread_idle_ms": (cycle - thread_s / batches) * 1000,
            "wait_until_image_encoder_ms": waited / calls * 1000 if calls else 0.0,
            "decoding_ms": decode_s / batches * 1000,
            "decoding_us_per_image": decode_s / images * 1e6 if images else 0.0}  # fmt: skip


def decode_floor_us(images: list[bytes], passes: int = 5) -> float:
    """µs to check and decode one of ``images`` as the pipeline does, on one thread; the best of ``passes``."""
    from fusionserve.preprocess import decode_image
    from fusionserve.server.limits import Limits, check_image_header
    from fusionserve.server.settings import ServerSettings

    limits = Limits.from_settings(ServerSettings())

    def decode_all() -> None:
        for data in images:
            check_image_header(data, limits)
            decode_image(data)

    return min(time_calls(decode_all, 0.0, passes)) / len(images) * 1e6


def report(row: dict[str, Any]) -> None:
    total = row["us_per_item"]
    print(f"\n{row['callers']} caller(s): {row['items_per_s']:.0f} items/s, {total:.0f} µs of server CPU per item")
    print("  mean batch: " + ", ".join(f"{m} {v:.1f}" for m, v in sorted(row["mean_batch_by_model"].items())))
    print("  cores: " + ", ".join(f"{k} {v:.2f}" for k, v in row["cores"].items()) + f" (of {os.cpu_count()})")
    lines = [(f"thread: {g}", v) for g, v in row["threads_us_per_item"].items()]
    lines += [(f"  model runs: {m}", v) for m, v in row["model_runs_us_per_item"].items()]
    lines += [(f"  event loop: {c}", v) for c, v in row.get("event_loop_us_per_item_by_task", {}).items()]
    for name, value in lines:
        print(f"  {name:<58}{value:8.0f} µs {100 * value / total:5.1f}%")
    cycle = row["batch_cycle"]
    if cycle:
        print(f"  pipeline batch cycle: one batch of {cycle['items_per_batch']:.1f} items every "
              f"{cycle['cycle_ms']:.1f} ms: the models' runs {cycle['models_ms']:.1f} ms, the batch thread's "
              f"other CPU {cycle['batch_thread_other_cpu_ms']:.1f} ms, the batch thread idle or waiting "
              f"{cycle['batch_thread_idle_ms']:.1f} ms; an item waits {cycle['wait_until_image_encoder_ms']:.1f} ms "
              "from reaching the pipeline to its image encoder's run")  # fmt: skip
        print(f"  decoding in the batch (the server's timers, wall): {cycle['decoding_ms']:.1f} ms a batch, "
              f"{cycle['decoding_us_per_image']:.0f} µs an image (alone: the floor)")  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--callers", nargs="+", type=int, default=[1, 32])
    p.add_argument("--duration-s", type=float, default=8.0)
    p.add_argument("--repository", type=Path)
    p.add_argument("--server-arg", action="append", default=[], help="extra 'fusionserve serve' argument")
    p.add_argument("--no-profile", action="store_true", help="CPU by thread only (no py-spy)")
    p.add_argument("--smoke", action="store_true", help="2 s per caller count, no profile (CI)")
    args = p.parse_args()
    duration_s = 2.0 if args.smoke else args.duration_s
    repo = repository(args.repository, smoke=args.smoke)
    tool = pa.ready()
    if isinstance(tool, str):
        print(tool)
        return 1
    floor = decode_floor_us([image for image, _ in samples(pa.INPUT_ITEMS)])
    print(f"floor: checking and decoding one image, one thread, a tight loop: {floor:.0f} µs")
    rows = []
    with ServerProcess(repo, "--embedding-cache-mb", "0", *args.server_arg, metrics_port=0) as server:
        time.sleep(2.0)  # done starting
        idle = idle_cpu_ms_per_s(server, 1.0 if args.smoke else 5.0)
        print(f"idle: {idle:.1f} ms of server CPU a second")
        for callers in args.callers:
            # py-spy needs to attach to another process (ptrace), which a CI container may not allow.
            row = measure(server, callers, duration_s, profile=not (args.no_profile or args.smoke), tool=tool)
            report(row)
            rows.append(row)
    payload = {"machine": machine(), "duration_s": duration_s, "server_args": args.server_arg,
               "idle_cpu_ms_per_s": idle, "decode_floor_us": floor, "rows": rows}  # fmt: skip
    path = write(result_name("cpu_budget", smoke=args.smoke), payload)
    print("\nwrote", path)
    print(json.dumps({r["callers"]: round(r["us_per_item"]) for r in rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

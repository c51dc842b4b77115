"""Triton's perf_analyzer, unchanged, against fusionserve: throughput, latency, and the server's own statistics.

perf_analyzer reads ModelMetadata, ModelConfig and ModelStatistics, then drives ModelInfer (or
ModelStreamInfer with --streaming); fusionserve answers all of them (Triton's model configuration
and statistics extensions), so the load tool SREs already use for Triton works unchanged. The
binary ships in the tritonclient 2.41.1 wheel (the perf-analyzer package on PyPI is a placeholder);
it loads libcudart (no GPU is used) and needs libb64:

    apt-get install -y libb64-0d          # once, as root
    python bench/perf_analyzer.py [--models image_encoder multimodal] [--concurrency 1 8]
                                  [--apis unary stream] [--workers 1 2] [--server-arg=--FLAG=VALUE ...]
                                  [--window-ms 3000] [--stability-percentage 10]
                                  [--repository REPO] [--perf-analyzer PATH] [--smoke]

The first run installs tritonclient (without its dependencies) and the CUDA runtime library into
bench/results/perf-venv. For ``multimodal`` it writes an --input-data file of real PNG images and
captions (IMAGE as base64 of the BYTES wire form: a 4-byte little-endian length, then the bytes).
Prints one row per model and concurrency: client throughput and latency percentiles, and the
server-side split perf_analyzer reads from ModelStatistics (queue, compute). ``--apis`` runs ModelInfer
(``unary``) and/or ModelStreamInfer (``stream``) in one run, ``--workers`` one server per worker count
(default settings otherwise, unless ``--server-arg`` says), so a closed-loop sweep such as
``--models multimodal --concurrency 32 128 512 1024 --apis unary stream --workers 1 2`` shows what
callers get at each size: every run that ends in an error (perf_analyzer stops at the first failed
call) is a FAILED row naming it, and the bench exits 1. ``--smoke``: multimodal
at concurrency 1, 1 s windows that may differ as they like (no claims on a shared CI machine), for CI.
Where perf_analyzer cannot be installed or cannot run (libb64 missing) it says why and exits 1.
Writes ``bench/results/perf_analyzer[-smoke].json``.
"""

from __future__ import annotations

import argparse
import base64
import csv
import json
import os
import shutil
import subprocess
import sys
import venv
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from _common import RESULTS, ServerProcess, machine, repository, result_name, samples, write

from fusionserve.v2_codec import serialize_bytes

PERF_VENV = RESULTS / "perf-venv"
TRITONCLIENT = "tritonclient==2.41.1"  # the last wheel that ships a working perf_analyzer


def _venv_python() -> Path:
    return PERF_VENV / "bin" / "python"


def install() -> Path:
    """perf_analyzer from the tritonclient wheel, in its own venv (once); the binary's path."""
    binary = PERF_VENV / "bin" / "perf_analyzer"
    if not binary.is_file():
        print(f"[perf_analyzer] installing {TRITONCLIENT} and the CUDA runtime into {PERF_VENV} (once)", flush=True)
        venv.create(PERF_VENV, with_pip=True)
        pip = [str(_venv_python()), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, "--no-deps", TRITONCLIENT], check=True)
        subprocess.run([*pip, "nvidia-cuda-runtime-cu12"], check=True)
    return binary


def library_path(binary: Path) -> str:
    """LD_LIBRARY_PATH holding libcudart.so.12 (from the nvidia-cuda-runtime-cu12 wheel beside the binary)."""
    python = binary.parent / "python"
    code = "import nvidia.cuda_runtime, os; print(os.path.join(list(nvidia.cuda_runtime.__path__)[0], 'lib'))"
    paths = []
    if python.is_file():  # a --perf-analyzer binary outside a venv brings its own library path
        found = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
        paths = [found.stdout.strip()] if found.returncode == 0 else []
    return os.pathsep.join([*paths, os.environ.get("LD_LIBRARY_PATH", "")]).strip(os.pathsep)


def missing_libraries(binary: Path, env: dict[str, str]) -> list[str]:
    """Shared libraries the binary needs and the loader cannot find (``ldd``)."""
    if shutil.which("ldd") is None:
        return []
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, env=env).stdout
    return [line.split()[0] for line in out.splitlines() if "not found" in line]


class Tool(NamedTuple):
    """What a perf_analyzer run needs: the binary, the environment it runs in, ``multimodal``'s input data."""

    binary: Path
    env: dict[str, str]
    data: Path


def ready(binary: Path | None = None) -> Tool | str:
    """perf_analyzer ready to run against ``multimodal``, or why it cannot run here.

    ``binary``: one to use instead of installing (or reusing) the tritonclient wheel's.
    """
    try:
        binary = binary or install()
    except (OSError, subprocess.CalledProcessError) as e:
        return f"perf_analyzer could not be installed: {e}"
    env = {**os.environ, "LD_LIBRARY_PATH": library_path(binary)}
    if missing := missing_libraries(binary, env):
        return f"perf_analyzer cannot run here: missing {', '.join(missing)} (libb64: apt-get install -y libb64-0d)"
    RESULTS.mkdir(parents=True, exist_ok=True)
    return Tool(binary, env, input_data(RESULTS / "perf_analyzer-multimodal-input.json"))


INPUT_ITEMS = 16
"""The (PNG, caption) items perf_analyzer sends in turn: ``samples(INPUT_ITEMS)``."""


def input_data(path: Path, n: int = INPUT_ITEMS) -> Path:
    """perf_analyzer --input-data for ``multimodal``: real PNGs (BYTES wire form, base64) and captions."""
    steps = [
        {"IMAGE": {"b64": base64.b64encode(serialize_bytes([img])).decode()}, "TEXT": [text]}
        for img, text in samples(n)
    ]
    path.write_text(json.dumps({"data": steps}))
    return path


RUN_TIMEOUT_S = 600
"""perf_analyzer's longest run: up to 10 windows until three agree, each a few seconds."""


def run_one(
    binary: Path, env: dict[str, str], target: str, model: str, concurrency: int, args: argparse.Namespace, data: Path,
    api: str = "unary", extra: Sequence[str] = (),
) -> dict[str, Any]:
    """One perf_analyzer run at one concurrency; its CSV row (latencies in µs) and its exit status.

    ``extra``: more perf_analyzer arguments (a header, say).
    """
    csv_path = RESULTS / f"perf_analyzer-{model}-c{concurrency}.csv"
    cmd = [str(binary), "-m", model, "-u", target, "-i", "grpc", "--concurrency-range", f"{concurrency}:{concurrency}",
           "--measurement-interval", str(args.window_ms), "-s", str(args.stability_percentage),
           "-f", str(csv_path)]  # fmt: skip
    if model == "multimodal":
        cmd += ["--input-data", str(data)]
    if api == "stream":
        cmd.append("--streaming")
    cmd += extra
    row: dict[str, Any] = {"model": model, "concurrency": concurrency, "api": api,
                           "command": " ".join(cmd[:1] + cmd[3:])}  # fmt: skip
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:  # a server that died under a stream leaves perf_analyzer waiting
        row["exit_status"], row["error"] = None, f"no result in {RUN_TIMEOUT_S} s: did the server die?"
        return row
    row["exit_status"] = done.returncode
    if done.returncode != 0 or not csv_path.is_file():
        row["error"] = (done.stdout + done.stderr).strip()[-2000:]
        return row
    with csv_path.open() as f:
        (values,) = list(csv.DictReader(f))
    csv_path.unlink()
    row.update({k: float(v) for k, v in values.items()})
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path)
    parser.add_argument("--models", nargs="+", default=["image_encoder", "multimodal"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--window-ms", type=int, default=3000, help="perf_analyzer --measurement-interval")
    parser.add_argument("--apis", nargs="+", choices=["unary", "stream"], default=["unary"],
                        help="unary: ModelInfer; stream: ModelStreamInfer (both: each in the same run)")
    parser.add_argument("--workers", nargs="+", default=["1"], help="one server per value of serve --workers")
    parser.add_argument("--server-arg", action="append", default=[], help="passed to fusionserve serve (repeatable)")
    parser.add_argument("--stability-percentage", type=int, default=10,
                        help="perf_analyzer -s: how far windows may differ (raise it on a shared machine)")
    parser.add_argument("--perf-analyzer", type=Path, help="a perf_analyzer binary (default: install one)")
    parser.add_argument("--smoke", action="store_true", help="multimodal, concurrency 1, 1 s windows (CI)")
    args = parser.parse_args()
    if args.smoke:
        # No claims in a smoke run: windows on a shared CI machine may differ as they like.
        args.models, args.concurrency, args.window_ms, args.stability_percentage = ["multimodal"], [1], 1000, 100
    found = ready(args.perf_analyzer)
    if isinstance(found, str):
        print(found)
        return 1
    binary, env, data = found

    apis = args.apis
    repo = repository(args.repository, smoke=args.smoke)
    rows = []
    for workers in args.workers:
        with ServerProcess(repo, "--workers", workers, *args.server_arg) as server:
            for model in args.models:
                for api in apis:
                    for concurrency in args.concurrency:
                        row = run_one(binary, env, server.target, model, concurrency, args, data, api)
                        rows.append({**row, "workers": workers})
    result = {"machine": machine(), "settings": {**{k: v for k, v in vars(args).items() if k != "perf_analyzer"},
              "repository": str(repo), "perf_analyzer": str(binary), "apis": apis}, "rows": rows}  # fmt: skip

    print(f"perf_analyzer, {args.window_ms} ms windows; latencies in ms; server columns are means from "
          "ModelStatistics; api: unary = ModelInfer, stream = ModelStreamInfer")  # fmt: skip
    print(f"{'model':<15}{'workers':>8}{'api':>7}{'conc':>6}{'infer/s':>10}{'p50':>9}{'p90':>9}{'p99':>9}"
          f"{'srv queue':>11}{'srv compute':>13}")  # fmt: skip
    failed = [r for r in rows if "error" in r]
    for r in rows:
        head = f"{r['model']:<15}{r['workers']:>8}{r['api']:>7}{r['concurrency']:>6}"
        if "error" in r:
            print(f"{head}  FAILED (exit {r['exit_status']}): {r['error'][-300:]}")
            continue
        print(f"{head}{r['Inferences/Second']:>10.0f}{r['p50 latency'] / 1e3:>9.2f}"
              f"{r['p90 latency'] / 1e3:>9.2f}{r['p99 latency'] / 1e3:>9.2f}{r['Server Queue'] / 1e3:>11.2f}"
              f"{r['Server Compute Infer'] / 1e3:>13.2f}")  # fmt: skip
    tags = [*(["stream"] if apis == ["stream"] else []), *([f"workers{'-'.join(args.workers)}"]
                                                            if args.workers != ["1"] else [])]  # fmt: skip
    print("wrote", write(result_name("perf_analyzer", smoke=args.smoke, tags=tags), result))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

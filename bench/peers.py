"""fusionserve beside PyTriton (Triton Inference Server's C++ core), the same job, one run, Triton's own client.

The peer serves the same repository's three ONNX files with the same preprocessing (fusionserve's own
plan, read from the pipeline's config: decode, resize, scale; tokenise, pad) in a PyTriton infer
function behind Triton's dynamic batcher, with one onnxruntime thread per model like the server. It runs
in a venv of its own (``bench/results/peers-venv``: ``nvidia-pytriton``, ``numpy<2`` and OpenCV 4.10,
which supports both; fusionserve installed there without its dependencies, for its preprocessing), made
once. Both answer the same 64 samples first; any difference over 1e-5 fails the run.

Then Triton's ``perf_analyzer`` (bench/perf_analyzer.py installs it) drives each server on the real job
(``multimodal``: a PNG and a caption per call, V2 unary and streaming) at 1, 8, 32 and 128 concurrent
calls: fusionserve with one process and with ``--workers 2`` (embedding cache off: every item is
computed), PyTriton with its dynamic batcher waiting 2 ms and 0 ms for a batch, and the floor of any
Python gRPC server here: grpc.aio answering fusionserve's recorded answer with no work
(bench/_grpc_floor.py). The raw pipeline (the same sessions called in-process, decode and tokenise
included, no server) gives the floor one caller can reach without gRPC.

    python bench/peers.py [--callers 1 8 32 128] [--apis unary stream] [--window-ms 3000]
                          [--repository REPO]

Prints infer/s and p50/p99 per server, API and caller count, the ratios to the best PyTriton variant,
and one caller's p50 beside the raw pipeline's; writes ``bench/results/peers.json``. Not part of CI's
smoke run (it installs Triton and takes about ten minutes, ten more when PyTriton dies under a
load); the figures and the command are in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import sysconfig
import time
import venv
from pathlib import Path
from typing import Any

import numpy as np
import perf_analyzer as pa
from _common import RESULTS, ServerProcess, machine, repository, samples, write
from _grpc_floor import FloorServer, pb, record
from overhead import RawPipeline, bench_raw

from fusionserve.v2_codec import add_raw_input, object_array

ROOT = Path(__file__).resolve().parent.parent
PEERS_VENV = RESULTS / "peers-venv"
PEER_PACKAGES = ["nvidia-pytriton", "numpy<2", "opencv-python-headless==4.10.0.84"]
PYTRITON_DELAYS_US = (2000, 0)
TOKEN = "fusionserve-bench"
"""PyTriton restricts Triton's model-control and statistics endpoints to a token; perf_analyzer sends it."""
TOKEN_HEADER = ("-H", f"triton-grpc-protocol-triton-access-token:{TOKEN}")
ATOL = 1e-5

# The peer: run by the peers venv's Python with (repository, gRPC port, HTTP port, metrics port, delay µs).
PEER = r'''
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

from fusionserve.preprocess import decode_image
from fusionserve.repository import load_config, version_dir
from fusionserve.server.pipeline_config import resolve

repo, grpc_port, http_port, metrics_port, delay_us = Path(sys.argv[1]), *map(int, sys.argv[2:6])
token = sys.argv[6]
latest = max(int(p.name) for p in (repo / "multimodal").iterdir() if p.name.isdigit())
pipeline = load_config(repo, "multimodal", latest)
steps = {name: load_config(repo, name, version) for name, version in pipeline.steps.items()}
plan = resolve(pipeline, steps, version_dir(repo, "multimodal", pipeline.version))
options = ort.SessionOptions()
options.intra_op_num_threads = options.inter_op_num_threads = 1
options.add_session_config_entry("session.intra_op.allow_spinning", "0")
sessions = {name: ort.InferenceSession(str(version_dir(repo, name, c.version) / str(c.model_file)), options,
                                       providers=["CPUExecutionProvider"]) for name, c in steps.items()}
labels = np.array([label.encode() for label in plan.labels], dtype=object)


@batch
def infer(IMAGE, TEXT):
    images = np.stack([plan.image_preprocessing.apply(decode_image(bytes(b))) for b in IMAGE[:, 0]])
    tokens = plan.vocabulary.encode([bytes(t).decode("utf-8") for t in TEXT[:, 0]])
    tokens = plan.vocabulary.cut(tokens) if plan.cut_text else tokens  # as fusionserve feeds such a text encoder
    fi = sessions[plan.image.model].run([plan.image.output], {plan.image.inputs[0]: images})[0]
    ft = sessions[plan.text.model].run([plan.text.output], {plan.text.inputs[0]: tokens})[0]
    feeds = {plan.fusion.inputs[0]: fi, plan.fusion.inputs[1]: ft}
    probabilities = sessions[plan.fusion.model].run([plan.fusion.output], feeds)[0]
    return {"PROBABILITIES": probabilities, "LABEL": labels[probabilities.argmax(1)][:, None]}


config = TritonConfig(grpc_port=grpc_port, http_port=http_port, metrics_port=metrics_port)
with Triton(config=config, security_config=TritonSecurityConfig(access_token=token)) as triton:
    triton.bind(
        model_name="multimodal",
        infer_func=infer,
        inputs=[Tensor(name="IMAGE", dtype=bytes, shape=(1,)), Tensor(name="TEXT", dtype=bytes, shape=(1,))],
        outputs=[Tensor(name="PROBABILITIES", dtype=np.float32, shape=(-1,)),
                 Tensor(name="LABEL", dtype=bytes, shape=(1,))],
        config=ModelConfig(max_batch_size=64, batcher=DynamicBatcher(max_queue_delay_microseconds=delay_us)),
        strict=True,
    )
    print("PEER READY", flush=True)
    triton.serve()
'''


def peers_python() -> Path:
    """The peers venv's Python, made once.

    It holds PyTriton, numpy<2, OpenCV 4.10 and the server's own onnxruntime version (CPU build), made
    once, and this checkout of fusionserve without its dependencies (for its preprocessing), installed
    editable on every run so the peer always preprocesses as the server under test does.
    """
    python = PEERS_VENV / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    if not (PEERS_VENV / ".complete").is_file():
        print(f"[peers] installing {', '.join(PEER_PACKAGES)} into {PEERS_VENV} (once)", flush=True)
        venv.create(PEERS_VENV, with_pip=True)
        import onnxruntime  # the server's own version, so both run the same kernels

        subprocess.run([*pip, *PEER_PACKAGES, f"onnxruntime=={onnxruntime.__version__}"], check=True)
        (PEERS_VENV / ".complete").touch()
    subprocess.run([*pip, "--no-deps", "-e", str(ROOT)], check=True)
    return python


def _free_ports(n: int) -> list[int]:
    import socket

    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class Peer:
    """A PyTriton server over ``repo`` with its dynamic batcher waiting ``delay_us`` for a batch."""

    def __init__(self, repo: Path, delay_us: int) -> None:
        python = peers_python()
        grpc_port, http_port, metrics_port = _free_ports(3)
        # A venv over a Python that is not the system's needs that Python's libpython on the loader's path.
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        env = {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(p for p in (libdir, os.environ.get("LD_LIBRARY_PATH"))
                                                                    if p)}  # fmt: skip
        command = [str(python), "-c", PEER, str(repo), str(grpc_port), str(http_port), str(metrics_port),
                   str(delay_us), TOKEN]  # fmt: skip
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.target = f"127.0.0.1:{grpc_port}"
        self.name = f"PyTriton, {delay_us / 1000:g} ms delay"
        log = []
        end = time.monotonic() + 180
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            log.append(line)
            if "PEER READY" in line:
                break
            if time.monotonic() > end:
                break
        if not any("PEER READY" in line for line in log):
            self.close()
            raise RuntimeError("PyTriton did not start:\n" + "".join(log[-40:]))
        self._wait_ready()

    def _wait_ready(self) -> None:
        import tritonclient.grpc as tc

        client = tc.InferenceServerClient(self.target)
        end = time.monotonic() + 60
        while time.monotonic() < end:
            try:
                if client.is_model_ready("multimodal"):
                    return
            except Exception:  # noqa: BLE001 - not up yet
                pass
            time.sleep(0.2)
        raise RuntimeError("PyTriton's model never became ready")

    def close(self) -> None:
        """Stop the peer (Triton and its Python side)."""
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def answers(target: str, items: list[tuple[bytes, str]]) -> np.ndarray:
    """PROBABILITIES for each item, one V2 call each, through tritonclient (both servers speak V2)."""
    import tritonclient.grpc as tc

    client = tc.InferenceServerClient(target)
    out = []
    for image, text in items:
        inputs = [tc.InferInput("IMAGE", [1, 1], "BYTES"), tc.InferInput("TEXT", [1, 1], "BYTES")]
        inputs[0].set_data_from_numpy(np.array([[image]], dtype=object))
        inputs[1].set_data_from_numpy(np.array([[text.encode()]], dtype=object))
        result = client.infer("multimodal", inputs, outputs=[tc.InferRequestedOutput("PROBABILITIES")])
        out.append(result.as_numpy("PROBABILITIES").reshape(-1))
    return np.stack(out)


def infer_request(image: bytes, text: str) -> pb.ModelInferRequest:
    """The V2 request perf_analyzer sends for one sample (IMAGE and TEXT as BYTES, every output)."""
    request = pb.ModelInferRequest(model_name="multimodal")
    for name, value in (("IMAGE", image), ("TEXT", text.encode())):
        add_raw_input(request, name, object_array([value]).reshape(1, 1))
    return request


def sweep(name: str, target: str, args: argparse.Namespace, tool: pa.Tool,
          extra: tuple[str, ...] = ()) -> list[dict]:  # fmt: skip
    """perf_analyzer at every caller count and API against one server (``extra``: more of its arguments)."""
    binary, env, data = tool
    rows = []
    for api in args.apis:
        for callers in args.callers:
            row = pa.run_one(binary, env, target, "multimodal", callers, args, data, api, extra)
            row["server"] = name
            rows.append(row)
            if "error" in row:
                figures = f"FAILED: {row['error'][-200:]}"
            else:
                figures = (f"{row['Inferences/Second']:8.0f} infer/s  p50 {row['p50 latency'] / 1e3:7.2f} ms  "
                           f"p99 {row['p99 latency'] / 1e3:7.2f} ms")  # fmt: skip
            print(f"  {name:<28} {api:<7} {callers:>4}  {figures}", flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--callers", nargs="+", type=int, default=[1, 8, 32, 128])
    p.add_argument("--apis", nargs="+", choices=["unary", "stream"], default=["unary", "stream"])
    p.add_argument("--window-ms", type=int, default=3000, help="perf_analyzer --measurement-interval")
    p.add_argument("--stability-percentage", type=int, default=50, help="perf_analyzer -s (a shared machine)")
    p.add_argument("--repository", type=Path)
    args = p.parse_args()
    repo = repository(args.repository)
    items = samples(64)
    tool = pa.ready()
    if isinstance(tool, str):
        print(tool)
        return 1

    raw = RawPipeline(repo)
    lone_raw = bench_raw(raw, items, 1, 3.0, gap_s=0.001)
    print(f"raw pipeline, one item at a time (decode and tokenise included): p50 {lone_raw['p50_ms']:.2f} ms")

    rows: list[dict[str, Any]] = []
    want = None
    for workers in ("1", "2"):
        name = f"fusionserve, {workers} process{'es' if workers != '1' else ''}"
        with ServerProcess(repo, "--workers", workers, "--embedding-cache-mb", "0") as server:
            got = answers(server.target, items)
            want = got if want is None else want
            print(f"{name}: answers equal within {np.abs(got - want).max():.1e}")
            if workers == "1":  # the floor's answers: this server's
                recorded = record(server.target, "multimodal", infer_request(*items[0]))
            rows += sweep(name, server.target, args, tool)
    with FloorServer(recorded) as floor:
        rows += sweep(floor.name, floor.target, args, tool, ("-x", floor.version))
    for delay_us in PYTRITON_DELAYS_US:
        peer = Peer(repo, delay_us)
        try:
            got = answers(peer.target, items)
            diff = float(np.abs(got - want).max())
            print(f"{peer.name}: answers differ from fusionserve's by at most {diff:.1e}")
            if diff > ATOL:
                raise AssertionError(f"{peer.name} answers differ from fusionserve's by {diff:.1e} (> {ATOL})")
            rows += sweep(peer.name, peer.target, args, tool, TOKEN_HEADER)
        finally:
            peer.close()

    print("\nratios to the best PyTriton variant at each API and caller count (infer/s):")
    ratios = {}
    for api in args.apis:
        for callers in args.callers:
            mine = {r["server"]: r.get("Inferences/Second", 0.0) for r in rows
                    if r["api"] == api and r["concurrency"] == callers}  # fmt: skip
            best_peer = max(v for k, v in mine.items() if k.startswith("PyTriton"))
            for server, value in mine.items():
                if not server.startswith("PyTriton") and best_peer:
                    ratios[f"{server} {api} {callers}"] = value / best_peer
                    print(f"  {server:<24} {api:<7} {callers:>4}: {value / best_peer:5.2f}x")
    for server in ("fusionserve, 1 process", FloorServer.name):
        lone = [r for r in rows if r["server"] == server and r["api"] == "unary" and r["concurrency"] == 1]
        if lone and "error" not in lone[0]:
            p50_ms = lone[0]["p50 latency"] / 1e3
            print(f"one caller: {server} p50 {p50_ms:.2f} ms ({p50_ms - lone_raw['p50_ms']:+.2f} ms beside the raw "
                  f"pipeline's {lone_raw['p50_ms']:.2f} ms)")  # fmt: skip
    path = write("peers", {"machine": machine(), "settings": vars(args) | {"repository": str(repo)},
                           "raw_pipeline": lone_raw, "rows": rows, "ratios": ratios})  # fmt: skip
    print("wrote", path)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

"""Shared bench plumbing: model repositories, onnxruntime sessions, a server process, machine info, output.

Also a small command line, used by ``bench/gpu.sh`` and handy by hand::

    python bench/_common.py repository --backbone vgg16 [--smoke]   # train + export once, print the path
    python bench/_common.py pack REPO DEST      # copy REPO, leaving the weights of big tensors out
    python bench/_common.py unpack DEST         # fill them with random values (no TensorFlow needed)
    python bench/_common.py export TRAINED REPO # export a trained folder as REPO's next version
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fusionserve.server.process import ServerProcess

__all__ = ["ServerProcess"]  # re-exported for the bench scripts

RESULTS = Path(__file__).resolve().parent / "results"
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
# Training samples per backbone: speed does not depend on accuracy, so a short training keeps the bench quick.
TRAIN_SAMPLES = {("small", False): 512, ("small", True): 256, ("vgg16", False): 64, ("vgg16", True): 64}


def trained_models(*, backbone: str = "small", smoke: bool = False) -> Path:
    """The folder of ``.keras`` files behind ``repository()``: trained once (1 epoch), then reused."""
    trained = RESULTS / f"trained-{backbone}{'-smoke' if smoke else ''}"
    if not (trained / "metrics.json").is_file():  # train() writes metrics.json last
        _build("train", backbone, smoke, trained)
    return trained


def repository(path: Path | None = None, *, backbone: str = "small", smoke: bool = False) -> Path:
    """A model repository to benchmark: the given one, or one trained and exported once into bench/results.

    Smoke runs get their own, smaller-trained repository, so it never stands in for a full run's.
    Training and export run in a child process: the bench process never imports TensorFlow.
    """
    if path is not None:
        return Path(path)
    repo = RESULTS / f"repo-{backbone}{'-smoke' if smoke else ''}"
    if not (repo / "multimodal").is_dir():
        _build("export", backbone, smoke, repo)
    return repo


def export_next_version(trained: Path, repo: Path) -> int:
    """Export ``trained`` into ``repo`` as its next version, in a child process (TensorFlow stays there)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, __file__, "export", str(trained), str(repo)], env=env,
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise RuntimeError(f"exporting {trained} into {repo} failed")
    return int(done.stdout.split()[-1])


def _build(what: str, backbone: str, smoke: bool, dest: Path) -> None:
    note = f"[bench] training + exporting the {backbone} bench models ({dest.name}), once: later runs reuse them"
    print(note, file=sys.stderr, flush=True)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    cmd = [sys.executable, __file__, "repository", "--backbone", backbone] + (["--smoke"] if smoke else [])
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise RuntimeError(f"building the bench {backbone} models failed ({' '.join(cmd)})")


def _build_here(backbone: str, smoke: bool) -> Path:
    """Train and export in this process (imports TensorFlow); each step lands in place only when it finished."""
    from fusionserve.export.convert import export_from_dir
    from fusionserve.export.train import train

    suffix = "-smoke" if smoke else ""
    trained, repo = RESULTS / f"trained-{backbone}{suffix}", RESULTS / f"repo-{backbone}{suffix}"
    if not (trained / "metrics.json").is_file():
        train(trained, backbone=backbone, samples=TRAIN_SAMPLES[backbone, smoke], epochs=1, probes=False)
    if not (repo / "multimodal").is_dir():
        staging = repo.with_name(repo.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        export_from_dir(trained, staging)
        shutil.rmtree(repo, ignore_errors=True)
        staging.rename(repo)
    return repo


def pack_weightless(repo: Path, dest: Path, min_bytes: int = 1 << 20) -> None:
    """Copy a repository, leaving out the data of every initializer over ``min_bytes`` (shapes stay).

    A random-weight VGG16 repository is 60 MB of incompressible floats: too big to carry to a
    machine without TensorFlow. Timings do not depend on the weights' values, so ``unpack_random``
    refills them there.
    """
    import onnx

    shutil.copytree(repo, dest)
    for path in dest.glob("*/*/model.onnx"):
        model = onnx.load(str(path))
        for tensor in model.graph.initializer:
            if len(tensor.raw_data) >= min_bytes:
                tensor.ClearField("raw_data")
                tensor.doc_string = "fusionserve-bench:random"
        onnx.save(model, str(path))


def unpack_random(dest: Path, seed: int = 0) -> None:
    """Fill what ``pack_weightless`` left out with small random values; update each config's sha256."""
    import onnx
    from onnx import helper, numpy_helper

    from fusionserve.repository import sha256_file

    rng = np.random.default_rng(seed)
    for path in dest.glob("*/*/model.onnx"):
        model = onnx.load(str(path))
        changed = False
        for i, tensor in enumerate(model.graph.initializer):
            if tensor.doc_string == "fusionserve-bench:random":
                dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
                fan_in = int(np.prod(tensor.dims[:-1])) if len(tensor.dims) > 1 else 1
                values = rng.normal(0, (2 / max(fan_in, 1)) ** 0.5, tuple(tensor.dims)).astype(dtype)
                model.graph.initializer[i].CopyFrom(numpy_helper.from_array(values, tensor.name))
                changed = True
        if changed:
            onnx.save(model, str(path))
            config_path = path.parent / "config.json"
            config = json.loads(config_path.read_text())
            config["sha256"] = sha256_file(path)
            config_path.write_text(json.dumps(config, indent=2))


def onnx_path(repo: Path, name: str) -> Path:
    """The latest version's ONNX file of a model in a repository."""
    from fusionserve.repository import list_versions, load_config, version_dir

    version = max(list_versions(repo, name))
    return version_dir(repo, name, version) / str(load_config(repo, name, version).model_file)


def samples(n: int, seed: int = 99, size: int = 64) -> list[tuple[bytes, str]]:
    """Distinct generated (PNG bytes, caption) items."""
    from fusionserve.data import encoded_pairs

    return encoded_pairs(n, seed, size)


def load(
    target: str,
    items: Sequence[tuple[bytes, str]] | None = None,
    *,
    duration_s: float,
    warmup_s: float = 0.5,
    payloads: Sequence[bytes] | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """One run of the load generator (fusionserve.client.loadgen) against ``target``, its figures flat.

    ``settings`` are LoadSettings fields (api, mode, concurrency, streams, rate, batch_size, model,
    connections, …); ``items`` are the (image, text) pairs, or ``payloads`` the pre-serialised requests.
    """
    from fusionserve.client.loadgen import LoadSettings, run

    s = LoadSettings(target=[target], duration_s=duration_s, warmup_s=warmup_s, progress=False, **settings)
    r = run(s, items, payloads=payloads).results
    latency = r["latency_ms"]
    out = {"items_per_s": r["items_per_s"], "requests_per_s": r["requests_per_s"], "errors": r["error_count"],
           **{f"{p}_ms": latency.get(p, float("nan")) for p in ("p50", "p90", "p99", "max")}}  # fmt: skip
    if s.open_loop:
        out["offered_items_per_s"] = s.rate * s.batch_size
    return out


def server_cuda_options(**overrides: str) -> dict[str, str]:
    """The server's default CUDA provider options (ServerSettings), with ``overrides`` on top."""
    from fusionserve.server.settings import ServerSettings

    return {**ServerSettings().cuda_provider_options(), **overrides}


def providers(device: str, cuda_options: Mapping[str, str] | None = None) -> list[Any]:
    """The onnxruntime providers for ``cpu`` or ``cuda`` (CUDA first, CPU for what CUDA does not run).

    On CUDA the options default to the server's own (``server_cuda_options``), so raw sessions and
    the server compare like with like; ``cuda_options`` replaces single options.
    """
    if device == "cpu":
        return [CPU]
    if device != "cuda":
        raise ValueError(f"device must be cpu or cuda, not {device!r}")
    return [(CUDA, server_cuda_options(**(cuda_options or {}))), CPU]


class OrtModel:
    """One onnxruntime session set up as the server sets up its own (threads, no spinning, I/O binding)."""

    def __init__(
        self,
        path: Path,
        *,
        device: str = "cpu",
        threads: int = 1,
        io_binding: bool = True,
        cuda_options: Mapping[str, str] | None = None,
    ) -> None:
        import onnxruntime as ort

        if device == "cuda":
            from fusionserve.server.runtime import cuda_unavailable_reason

            cuda_unavailable_reason()  # loads the NVIDIA pip libraries, as the server does

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # the server's default is 1
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=providers(device, cuda_options))
        if device == "cuda" and self.session.get_providers()[0] != CUDA:
            raise RuntimeError(f"{path}: the CUDA execution provider did not load ({self.session.get_providers()})")
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.io_binding = io_binding and device == "cuda"

    def provider_options(self) -> dict[str, Any]:
        """The options each provider really runs with (onnxruntime fills in its defaults)."""
        return self.session.get_provider_options()

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run one batch; outputs in the graph's order."""
        if self.io_binding:
            binding = self.session.io_binding()
            for name, value in feeds.items():
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
            for name in self.outputs:
                binding.bind_output(name, "cpu")
            self.session.run_with_iobinding(binding)
            return binding.copy_outputs_to_cpu()
        return self.session.run(None, dict(feeds))


def machine() -> dict[str, Any]:
    """Machine and versions, recorded with every result."""
    import onnxruntime

    import fusionserve

    info: dict[str, Any] = {
        "cpu": _cpu_model() or platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_providers": onnxruntime.get_available_providers(),
        "fusionserve": fusionserve.__version__,
        "platform": platform.platform(),
        "load_average": os.getloadavg(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)  # fmt: skip
        if gpu.returncode == 0:
            info["gpu"] = gpu.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return info


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def percentiles(latencies_s: list[float]) -> dict[str, float]:
    """p50/p90/p99/max in milliseconds."""
    if not latencies_s:
        return {"p50_ms": float("nan"), "p90_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan")}
    a = np.asarray(latencies_s) * 1000
    return {
        "p50_ms": float(np.percentile(a, 50)),
        "p90_ms": float(np.percentile(a, 90)),
        "p99_ms": float(np.percentile(a, 99)),
        "max_ms": float(a.max()),
    }


def result_name(name: str, *, smoke: bool = False, device: str = "cpu", tags: Sequence[str] = ()) -> str:
    """File stem for a result: ``scaling``, ``scaling-cuda-no-iobinding``, ``scaling-smoke`` and so on."""
    parts = [name, *([] if device == "cpu" else [device]), *tags, *(["smoke"] if smoke else [])]
    return "-".join(parts)


def write(name: str, payload: dict[str, Any]) -> Path:
    """Write a result JSON into bench/results/."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=_jsonable))
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (Path, tuple)):
        return str(value) if isinstance(value, Path) else list(value)
    raise TypeError(f"not JSON serialisable: {type(value)}")


def pyplot():
    """The pyplot module on the Agg backend, or None where matplotlib is not installed (then no PNG)."""
    try:
        import matplotlib
    except ImportError:
        print("[bench] matplotlib is not installed: no plot", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, name: str) -> Path:
    """Save a figure as bench/results/<name>.png."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("repository", help="train (1 epoch) and export the bench models once; print the path")
    p.add_argument("--backbone", choices=["small", "vgg16"], default="small")
    p.add_argument("--smoke", action="store_true")
    p = sub.add_parser("pack", help="copy a repository without its big weights")
    p.add_argument("repo", type=Path)
    p.add_argument("dest", type=Path)
    p = sub.add_parser("unpack", help="fill a packed repository with random weights, in place")
    p.add_argument("dest", type=Path)
    p = sub.add_parser("export", help="export a trained folder into a repository as its next version")
    p.add_argument("trained", type=Path)
    p.add_argument("repo", type=Path)
    args = parser.parse_args()
    if args.command == "repository":
        print(_build_here(args.backbone, args.smoke))
    elif args.command == "pack":
        pack_weightless(args.repo, args.dest)
    elif args.command == "export":
        from fusionserve.export.convert import export_from_dir

        print(export_from_dir(args.trained, args.repo).pipeline_version)
    else:
        unpack_random(args.dest)


if __name__ == "__main__":
    _main()


def time_calls(fn, duration_s: float, min_calls: int = 3) -> list[float]:
    """Seconds per call of ``fn``, for at least ``duration_s`` and ``min_calls`` calls."""
    times: list[float] = []
    end = time.perf_counter() + duration_s
    while len(times) < min_calls or time.perf_counter() < end:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times

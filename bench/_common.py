"""Shared bench plumbing: a model repository, a server process, machine info, JSON output."""

from __future__ import annotations

import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def repository(path: Path | None = None, *, backbone: str = "small") -> Path:
    """A model repository to benchmark: the given one, or one trained and exported once into bench/results."""
    if path is not None:
        return Path(path)
    repo = RESULTS / f"repo-{backbone}"
    if (repo / "multimodal").is_dir():
        return repo
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from fusionserve.export.convert import export_from_dir
    from fusionserve.export.train import train

    trained = RESULTS / f"trained-{backbone}"
    # Speed does not depend on accuracy: a short training keeps the bench quick.
    train(trained, backbone=backbone, samples=512 if backbone == "small" else 64, epochs=1, probes=False)
    export_from_dir(trained, repo)
    return repo


def samples(n: int, seed: int = 99, size: int = 64) -> list[tuple[bytes, str]]:
    """Distinct generated (PNG bytes, caption) items."""
    from fusionserve.export import data
    from fusionserve.preprocess import encode_png

    ds = data.generate(n, seed=seed, size=size)
    return [(encode_png(img), cap) for img, cap in zip(ds.images, ds.captions, strict=True)]


class ServerProcess:
    """``fusionserve serve`` in its own process (so the load generator does not share its GIL)."""

    def __init__(self, repo: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fusionserve", "serve", "--repository", str(repo), "--host", "127.0.0.1",
             "--port", "0", "--metrics-port", "-1", *args],
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.proc.stderr is not None
        deadline = time.time() + 120
        while time.time() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            if m := re.search(r"listening on .* \(port (\d+)\)", line):
                self.target = f"127.0.0.1:{m.group(1)}"
                return
        self.proc.kill()
        raise RuntimeError("server did not start")

    def rss_mb(self) -> float:
        """Resident memory of the server process."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        """SIGTERM and wait."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def machine() -> dict[str, Any]:
    """Machine and versions, recorded with every result."""
    import onnxruntime

    import fusionserve

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "fusionserve": fusionserve.__version__,
        "platform": platform.platform(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


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


def write(name: str, payload: dict[str, Any]) -> Path:
    """Write a result JSON into bench/results/."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path

"""``fusionserve demo``: train → export → serve → classify, end to end, on generated data."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path


def _start_server(repository: Path) -> tuple[subprocess.Popen, int]:
    """Start ``fusionserve serve`` as its own process (no TensorFlow in it) on a free port."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "fusionserve", "serve", "--repository", str(repository),
         "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    deadline = time.time() + 120
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        if m := re.search(r"listening on .* \(port (\d+)\)", line):
            return proc, int(m.group(1))
    proc.kill()
    raise RuntimeError("the server did not start; run 'fusionserve serve' by hand to see why")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_demo(workdir: Path, *, samples: int = 5000, epochs: int = 3, seed: int = 0) -> int:
    """Run the whole product once and print what each step did."""
    from fusionserve.client import FusionClient
    from fusionserve.export import data
    from fusionserve.export.convert import export_from_dir
    from fusionserve.export.train import train
    from fusionserve.preprocess import encode_png

    workdir = Path(workdir)
    trained, repository = workdir / "trained", workdir / "model-repository"
    started = time.perf_counter()
    print(f"[1/4] training on {samples} generated image-caption pairs ({epochs} epochs)…", flush=True)
    metrics = train(trained, samples=samples, epochs=epochs, seed=seed).metrics
    print(f"      fused test accuracy {metrics['fused_test_accuracy']:.3f} | "
          f"image-only probe {metrics['image_only_test_accuracy']:.3f} | "
          f"text-only probe {metrics['text_only_test_accuracy']:.3f}")  # fmt: skip
    print(f"[2/4] exporting to ONNX with tf2onnx → {repository}", flush=True)
    result = export_from_dir(trained, repository)
    print(f"      {'model':<14}{'version':>8}{'max |Keras-ONNX|':>18}{'bytes':>11}")
    for m in result.models:
        print(f"      {m.name:<14}{m.version:>8}{m.max_abs_diff:>18.2e}{m.onnx_bytes:>11,}")
    print(f"      train + export took {time.perf_counter() - started:.0f} s")
    print("[3/4] starting 'fusionserve serve' (onnxruntime, no TensorFlow)…", flush=True)
    proc, port = _start_server(repository)
    try:
        target = f"127.0.0.1:{port}"
        print(f"      serving on {target}; server resident memory {_rss_mb(proc.pid):.0f} MB")
        print("[4/4] classifying held-out samples through gRPC", flush=True)
        ds = data.generate(200, seed=seed + 777)
        items = [(encode_png(img), cap) for img, cap in zip(ds.images, ds.captions, strict=True)]
        with FusionClient(target, timeout_s=30) as client:
            shown = client.classify_batch(items[:8])
            print(f"      {'caption':<52}{'truth':>10}{'predicted':>11}{'p(match)':>10}")
            for (_, caption), truth, r in zip(items[:8], ds.labels[:8], shown, strict=True):
                print(f"      {caption:<52}{data.LABELS[truth]:>10}{r.label:>11}{r.probabilities[1]:>10.3f}")
            results = [r for start in range(0, 200, 50) for r in client.classify_batch(items[start : start + 50])]
            correct = sum(r.label == data.LABELS[t] for r, t in zip(results, ds.labels, strict=True))
            print(f"      accuracy through the server on 200 held-out pairs: {correct / 200:.3f}")
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    print(f"done: server drained and exited with {code}; repository left in {repository}")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(run_demo(Path(os.environ.get("FUSIONSERVE_DEMO_DIR", "fusionserve-demo"))))

"""``fusionserve demo``: train → export → serve → classify, end to end, on generated data."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from fusionserve.export import DEFAULT_EPOCHS, DEFAULT_SAMPLES


def run_demo(workdir: Path, *, samples: int = DEFAULT_SAMPLES, epochs: int = DEFAULT_EPOCHS, seed: int = 0) -> int:
    """Run the whole product once and print what each step did."""
    from fusionserve.export.cli import import_tensorflow_quietly
    from fusionserve.extras import require

    require("export", "fusionserve demo")
    require("server", "fusionserve demo")

    import_tensorflow_quietly()
    from fusionserve import data
    from fusionserve.client import FusionClient
    from fusionserve.export.convert import export_from_dir
    from fusionserve.export.train import train
    from fusionserve.preprocess import encode_png
    from fusionserve.server.process import ServerProcess

    workdir = Path(workdir)
    trained, repository = workdir / "trained", workdir / "model-repository"
    started = time.perf_counter()
    print(f"[1/4] training on {samples} generated image-caption pairs ({epochs} epochs)…", flush=True)
    metrics = train(trained, samples=samples, epochs=epochs, seed=seed, progress=False).metrics
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
    server = ServerProcess(repository)
    try:
        target = server.target
        print(f"      serving on {target}; server resident memory {server.rss_mb():.0f} MB")
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
        code = server.close()
    print(f"done: server drained and exited with {code}; repository left in {repository}")
    return 0 if code == 0 else 1


def cmd_demo(args: argparse.Namespace) -> int:
    """Train → export → serve → classify, end to end."""
    return run_demo(Path(args.workdir), samples=args.samples, epochs=args.epochs, seed=args.seed)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``demo`` subcommand."""
    p = sub.add_parser("demo", help="train → export → serve → classify, end to end")
    p.add_argument("--workdir", default="fusionserve-demo", help="where models and the repository go")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES)
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

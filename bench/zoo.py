"""Users' own architectures: export cost per zoo model, and the heaviest image encoder served vs raw onnxruntime.

1. Every model of the zoo (tests/zoo_models.py: five image encoders at 32×32, five text encoders on
   12 tokens, three fusion heads) converted as ``fusionserve export`` converts it: tf2onnx, the gate,
   the Keras parity check. Seconds and ONNX bytes each.
2. The heaviest image encoder, VGG16 at 224×224 (the recipe of docs/YOUR_MODELS.md, with ``caffe``
   preprocessing), exported and served: images per second through ``Embed`` (one call of 1 or 32
   PNG images) against the same work in-process (decode, preprocess, ``session.run`` on one
   onnxruntime session with the server's thread settings), in one run, the embedding cache off.

    python bench/zoo.py [--duration 5] [--smoke]     # --smoke: the plain CNN at 32×32, a fraction of a second each
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import ServerProcess, machine, onnx_path, result_name, samples, time_calls, write

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.zoo_models: the builders the zoo test uses

SIZE, LENGTH, FEATURES, ROWS = 32, 12, 16, 64


def export_costs(smoke: bool) -> list[dict[str, Any]]:
    """Convert, gate and parity-check each zoo model alone, as an export does."""
    import keras

    from fusionserve.export import convert
    from fusionserve.preprocess import ImagePreprocessing, Vocabulary
    from tests import zoo_models as zoo

    vocab = Vocabulary({"a": 2, "red": 3}, ROWS, LENGTH)
    images, tokens = convert.parity_inputs(ImagePreprocessing(SIZE, SIZE), vocab, convert.PARITY_SAMPLES)
    features = np.random.default_rng(0).normal(size=(len(images), FEATURES)).astype(np.float32)
    plans = [(f"image {k}", lambda k=k: zoo.image_model(k, SIZE, FEATURES), ["image"], {"image": images})
             for k in (("cnn",) if smoke else zoo.IMAGE_ENCODERS)]  # fmt: skip
    plans += [(f"text {k}", lambda k=k: zoo.text_model(k, LENGTH, FEATURES, ROWS), ["tokens"], {"tokens": tokens})
              for k in (("lstm",) if smoke else zoo.TEXT_ENCODERS)]  # fmt: skip
    plans += [(f"fusion {k}", lambda k=k: zoo.fusion_model(k, FEATURES), ["image_features", "text_features"],
               {"image_features": features, "text_features": features})
              for k in (("mlp",) if smoke else zoo.FUSIONS)]  # fmt: skip
    rows = []
    for label, build, inputs, feeds in plans:
        keras.utils.set_random_seed(0)
        model = build()
        if label.startswith("image"):
            zoo.calibrate(model, images)  # features at unit spread, so max |Δ| means something
        started = time.perf_counter()
        proto = convert.to_onnx(model, label, inputs, ["out"], convert.DEFAULT_OPSET)
        ops = convert.gate(proto, label, convert.layer_names(model))
        data = proto.SerializeToString()
        diff = convert.parity(model, data, feeds, label)
        rows.append({"model": label, "export_s": time.perf_counter() - started, "onnx_bytes": len(data),
                     "max_abs_diff": diff, "ops": len(ops)})  # fmt: skip
        print(f"{label:<24}{rows[-1]['export_s']:>8.1f} s{len(data) / 1e6:>10.2f} MB   max |Δ| {diff:.1e}", flush=True)
    return rows


def served_vs_raw(repo_dir: Path, smoke: bool, duration_s: float) -> dict[str, Any]:
    """Images per second of the image encoder: through the server's Embed vs in-process, batch 1 and 32."""
    import keras
    import onnxruntime as ort

    from fusionserve.client import FusionClient
    from fusionserve.export.convert import export
    from fusionserve.preprocess import Vocabulary, decode_image
    from fusionserve.repository import load_config
    from fusionserve.server.pipeline_config import resolve
    from fusionserve.server.settings import ServerSettings
    from tests import zoo_models as zoo

    kind, size = ("cnn", SIZE) if smoke else ("VGG16", 224)
    keras.utils.set_random_seed(0)
    started = time.perf_counter()
    export(zoo.image_model(kind, size, 64), zoo.text_model("lstm", LENGTH, 64, ROWS), zoo.fusion_model("mlp", 64),
           Vocabulary({"a": 2}, ROWS, LENGTH), None, repo_dir, preprocessing="caffe", fusion_outputs=None,
           samples=8)  # fmt: skip
    export_s = time.perf_counter() - started
    pipeline = load_config(repo_dir, "multimodal", 1)
    steps = {m: load_config(repo_dir, m, v) for m, v in pipeline.steps.items()}
    plan = resolve(pipeline, steps, repo_dir / "multimodal" / "1")
    settings = ServerSettings()
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.intra_op_threads or 0
    session = ort.InferenceSession(str(onnx_path(repo_dir, "image_encoder")), options,
                                   providers=["CPUExecutionProvider"])  # fmt: skip
    pictures = [image for image, _ in samples(32, size=size)]
    out: dict[str, Any] = {"image_encoder": kind, "size": size, "export_s": export_s}
    # The embedding cache off: each call computes (the same images are sent again and again).
    with ServerProcess(repo_dir, "--embedding-cache-mb", "0") as server, \
            FusionClient(server.target, timeout_s=600) as client:
        for batch in (1, 32):
            chosen = pictures[:batch]

            def raw(chosen=chosen) -> None:
                pixels = np.stack([plan.image_preprocessing.apply(decode_image(p)) for p in chosen])
                session.run(None, {"image": pixels})

            def served(chosen=chosen) -> None:
                client.embed(images=chosen)

            for fn in (raw, served):
                fn()  # warm-up
            raw_s = statistics.median(time_calls(raw, duration_s))
            served_s = statistics.median(time_calls(served, duration_s))
            out[f"batch_{batch}"] = {"raw_images_per_s": batch / raw_s, "served_images_per_s": batch / served_s,
                                     "served_over_raw": raw_s / served_s}  # fmt: skip
            print(f"{kind} {size}x{size}, batch {batch:>2}: raw {batch / raw_s:8.2f} images/s, served "
                  f"{batch / served_s:8.2f} images/s, served/raw {raw_s / served_s:.2f}", flush=True)  # fmt: skip
    return out


def main() -> None:
    """Parse arguments, run both parts, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement (part 2)")
    parser.add_argument("--smoke", action="store_true", help="the plain CNN and one model of each kind")
    args = parser.parse_args()
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # Keras on the CPU: parity is checked there
    from fusionserve.export.cli import import_tensorflow_quietly

    import_tensorflow_quietly()
    duration = 0.2 if args.smoke else args.duration
    print("part 1: export cost per zoo model (tf2onnx + gate + parity)")
    costs = export_costs(args.smoke)
    print("part 2: the heaviest image encoder, served vs raw onnxruntime")
    with tempfile.TemporaryDirectory() as tmp:
        serving = served_vs_raw(Path(tmp) / "repo", args.smoke, duration)
    path = write(result_name("zoo", smoke=args.smoke), {"machine": machine(), "duration_s": duration,
                                                        "export": costs, "served_vs_raw": serving})  # fmt: skip
    print(f"written: {path}")


if __name__ == "__main__":
    main()

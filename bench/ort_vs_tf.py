"""onnxruntime vs TensorFlow on the same models: median time per call and speed-up ratios.

For each model (image_encoder, text_encoder, fusion) and the whole pipeline (preprocessed tensors in
→ probabilities), at batch 1 and 32, in one process:

- ``keras call``: ``model(x)`` (Keras 3 runs it eagerly, layer by layer);
- ``predict``: ``model.predict(x)`` (a compiled graph plus per-call dataset and callback setup);
- ``tf.function``: the model traced once into a graph, called directly (predict without its set-up);
- ``onnxruntime``: ``session.run`` on the exported ONNX file (the pipeline is three runs, as served).

The Keras models are the ``.keras`` files the repository was exported from (``bench/results/
trained-small``); the ONNX files come from the repository. Target: onnxruntime ≥ 5× faster than
``predict`` at batch 1 for the pipeline.

    python bench/ort_vs_tf.py [--repository REPO --trained DIR] [--duration 2] [--threads 0] [--smoke]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from _common import OrtModel, machine, onnx_path, repository, result_name, time_calls, trained_models, write

from fusionserve.preprocess import Vocabulary

BATCHES = (1, 32)
TARGET_PIPELINE_B1 = 5.0
ENGINES = ("keras call", "predict", "tf.function", "onnxruntime")


def median_call_s(fn: Callable[[], Any], duration_s: float, min_calls: int = 5, warmup: int = 2) -> dict[str, Any]:
    """Median (and min) seconds per call of ``fn`` over ``duration_s``, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = time_calls(fn, duration_s, min_calls)
    return {"median_ms": statistics.median(times) * 1000, "min_ms": min(times) * 1000, "calls": len(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, help="model repository (default: the bench's own)")
    parser.add_argument("--trained", type=Path, help="the .keras files REPOSITORY was exported from")
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per measurement")
    parser.add_argument("--threads", type=int, default=0,
                        help="intra-op threads for both engines (0: each one's default, all cores)")  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="seconds-long run for CI (no claims)")
    args = parser.parse_args()
    duration = 0.15 if args.smoke else args.duration
    if args.repository is not None and args.trained is None:
        parser.error("--repository needs --trained: the .keras files it was exported from")
    repo = repository(args.repository, smoke=args.smoke)
    trained = args.trained or trained_models(smoke=args.smoke)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    started = time.perf_counter()
    import keras
    import tensorflow as tf

    import_s = time.perf_counter() - started
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    from fusionserve import data

    names = ("image_encoder", "text_encoder", "fusion")
    started = time.perf_counter()
    keras_models = {n: keras.models.load_model(trained / f"{n}.keras", compile=False) for n in names}
    load_s = time.perf_counter() - started
    image, text, fusion = (keras_models[n] for n in names)
    keras_models["pipeline"] = keras.Model(
        [image.input, text.input], fusion([image.output, text.output]), name="pipeline"
    )
    ort = {n: OrtModel(onnx_path(repo, n), threads=args.threads, io_binding=False) for n in names}

    size = int(image.inputs[0].shape[1])
    vocab = Vocabulary.load(trained / "vocab.json")
    ds = data.generate(max(BATCHES), seed=7, size=size)
    images_all = ds.images.astype(np.float32) / np.float32(255.0)
    tokens_all = vocab.encode(ds.captions)
    features_i = np.asarray(image(images_all))
    features_t = np.asarray(text(tokens_all))

    def ort_pipeline(x: list[np.ndarray]) -> np.ndarray:
        fi = ort["image_encoder"].run({"image": x[0]})[0]
        ft = ort["text_encoder"].run({"tokens": x[1]})[0]
        return ort["fusion"].run({"image_features": fi, "text_features": ft})[0]

    runs: dict[str, dict[str, dict[str, Any]]] = {}
    for target in (*names, "pipeline"):
        model = keras_models[target]
        graph = tf.function(lambda x, m=model: m(x, training=False), reduce_retracing=True)
        for batch in BATCHES:
            x = {
                "image_encoder": images_all[:batch],
                "text_encoder": tokens_all[:batch],
                "fusion": [features_i[:batch], features_t[:batch]],
                "pipeline": [images_all[:batch], tokens_all[:batch]],
            }[target]
            if target == "pipeline":
                run_ort = lambda x=x: ort_pipeline(x)  # noqa: E731
            else:
                feeds = dict(zip([i.name for i in ort[target].session.get_inputs()],
                                 x if isinstance(x, list) else [x], strict=True))  # fmt: skip
                run_ort = lambda feeds=feeds, target=target: ort[target].run(feeds)[0]  # noqa: E731
            calls = {
                "keras call": lambda x=x, m=model: np.asarray(m(x, training=False)),
                "predict": lambda x=x, m=model, b=batch: m.predict(x, batch_size=b, verbose=0),
                "tf.function": lambda x=x, g=graph: np.asarray(g(x)),
                "onnxruntime": run_ort,
            }
            key = f"{target}_b{batch}"
            runs[key] = {engine: median_call_s(fn, duration) for engine, fn in calls.items()}
            runs[key]["max_abs_diff"] = float(np.max(np.abs(calls["onnxruntime"]() - calls["keras call"]())))

    ratios = {
        key: {f"{engine} ÷ onnxruntime": r[engine]["median_ms"] / r["onnxruntime"]["median_ms"]
              for engine in ENGINES[:3]}
        for key, r in runs.items()
    }  # fmt: skip
    headline = ratios["pipeline_b1"]["predict ÷ onnxruntime"]
    results: dict[str, Any] = {
        "machine": {**machine(), "tensorflow": tf.__version__, "keras": keras.__version__},
        "settings": {"duration_s": duration, "batches": BATCHES, "threads": args.threads or "default (all cores)",
                     "repository": str(repo), "trained": str(trained),
                     "onnxruntime": "CPUExecutionProvider, graph optimisation all, no spinning",
                     "tensorflow_import_s": import_s, "keras_load_s": load_s},
        "runs": runs,
        "ratios": ratios,
        "target": {"pipeline_b1_onnxruntime_vs_predict": headline, "wanted": TARGET_PIPELINE_B1,
                   "met": headline >= TARGET_PIPELINE_B1},
    }  # fmt: skip

    print(f"median ms per call ({duration:g}s each, threads: {args.threads or 'default'}); "
          "ratio = TensorFlow ÷ onnxruntime (how many times faster onnxruntime is)")  # fmt: skip
    print(f"{'model':<15}{'batch':>6}" + "".join(f"{e:>13}" for e in ENGINES)
          + f"{'call ×':>9}{'predict ×':>11}{'tf.fn ×':>9}{'max |Δ|':>10}")  # fmt: skip
    for key, r in runs.items():
        target, batch = key.rsplit("_b", 1)
        q = list(ratios[key].values())
        print(f"{target:<15}{batch:>6}" + "".join(f"{r[e]['median_ms']:>13.3f}" for e in ENGINES)
              + f"{q[0]:>9.1f}{q[1]:>11.1f}{q[2]:>9.1f}{r['max_abs_diff']:>10.1e}")  # fmt: skip
    verdict = "met" if headline >= TARGET_PIPELINE_B1 else "NOT met"
    print(f"\npipeline, batch 1: onnxruntime is {headline:.1f}× faster than Keras predict "
          f"(target ≥ {TARGET_PIPELINE_B1:g}×: {verdict})")  # fmt: skip
    print(f"TensorFlow import {import_s:.1f}s, loading the three .keras files {load_s:.1f}s")
    print("wrote", write(result_name("ort_vs_tf", smoke=args.smoke), results))


if __name__ == "__main__":
    main()

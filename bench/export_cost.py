"""Export cost: wall time of ``fusionserve export`` per model and stage, and ONNX size per model.

For each backbone, in one process (TensorFlow imported once, its import timed):

1. a fresh export of the bench's trained ``.keras`` files into a temporary repository
   (``export_from_dir``, as ``fusionserve export --from`` runs it): seconds and ONNX bytes per model
   read from the ``ExportResult``, and the whole call's wall time;
2. the same steps one by one through the export module's public functions (tf2onnx conversion,
   op gate, writing the file, Keras-vs-onnxruntime parity on 64 samples), repeated for
   ``--duration`` seconds per model (at least once), median per stage.

The first conversion in a process also pays tf2onnx's one-off set-up, so step 1's first model
costs more than its step-2 figure.

    python bench/export_cost.py [--backbones small,vgg16] [--duration 10] [--repository REPO] [--smoke]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import machine, pyplot, result_name, save_figure, trained_models, write

STAGES = ("convert", "gate", "write", "parity")
MODELS = ("image_encoder", "text_encoder", "fusion")


def stage_breakdown(trained: Path, duration_s: float, workdir: Path) -> dict[str, Any]:
    """Each export step timed on its own through the public functions of ``fusionserve.export.convert``."""
    import numpy as np

    from fusionserve.export import convert
    from fusionserve.preprocess import ImagePreprocessing, Vocabulary
    from fusionserve.repository import TensorSpec

    started = time.perf_counter()
    models = {n: convert.load_keras_model(trained / f"{n}.keras", n) for n in MODELS}
    load_s = time.perf_counter() - started
    vocab = Vocabulary.load(trained / "vocab.json")
    started = time.perf_counter()
    size = (int(models["image_encoder"].inputs[0].shape[1]), int(models["image_encoder"].inputs[0].shape[2]))
    images, tokens = convert.parity_inputs(ImagePreprocessing(*size), vocab, convert.PARITY_SAMPLES)
    features_i = np.asarray(models["image_encoder"](images))
    features_t = np.asarray(models["text_encoder"](tokens))
    inputs_s = time.perf_counter() - started
    plans = {
        "image_encoder": (["image"], ["image_features"], {"image": images}),
        "text_encoder": (["tokens"], ["text_features"], {"tokens": tokens}),
        "fusion": (["image_features", "text_features"], ["probabilities"],
                   {"image_features": features_i, "text_features": features_t}),
    }  # fmt: skip
    out: dict[str, Any] = {"load_keras_s": load_s, "parity_inputs_s": inputs_s, "models": {}}
    for name, (ins, outs, feeds) in plans.items():
        times: dict[str, list[float]] = {s: [] for s in STAGES}
        end = time.perf_counter() + duration_s
        while not times["parity"] or time.perf_counter() < end:
            t0 = time.perf_counter()
            if name == "text_encoder":  # as the export does it: the padding check and cut included
                specs = [TensorSpec(n, "INT32", (-1, vocab.max_length)) for n in ins]
                specs_out = [TensorSpec(n, "FP32", (-1, features_t.shape[1])) for n in outs]
                proto = convert.text_encoder_onnx(models[name], vocab, specs, specs_out, convert.DEFAULT_OPSET)[0]
            else:
                proto = convert.to_onnx(models[name], name, ins, outs, convert.DEFAULT_OPSET)
            t1 = time.perf_counter()
            convert.gate(proto, name)
            t2 = time.perf_counter()
            path = workdir / f"{name}.onnx"
            path.write_bytes(proto.SerializeToString())
            t3 = time.perf_counter()
            convert.parity(models[name], path, feeds, name)
            t4 = time.perf_counter()
            for stage, seconds in zip(STAGES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                times[stage].append(seconds)
        out["models"][name] = {
            **{f"{s}_s": statistics.median(v) for s, v in times.items()},
            "repeats": len(times["parity"]),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, help="export into this repository (kept) instead of a temporary one")
    parser.add_argument("--backbones", default="small,vgg16", help="comma-separated (--smoke: small only)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of repeated stage timing per model")
    parser.add_argument("--smoke", action="store_true", help="seconds-long run for CI (no claims)")
    args = parser.parse_args()
    duration = 0.0 if args.smoke else args.duration
    backbones = args.backbones.split(",")
    notes = []
    if args.smoke and "vgg16" in backbones:
        backbones.remove("vgg16")
        notes.append("--smoke: vgg16 skipped (its export alone takes about a minute on 2 CPU cores)")
        print(f"note: {notes[-1]}")
    trained = {b: trained_models(backbone=b, smoke=args.smoke) for b in backbones}  # trains once, not timed

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    started = time.perf_counter()
    import tensorflow as tf  # noqa: F401  (timed: every export pays it)
    import tf2onnx  # noqa: F401

    from fusionserve.export.convert import export_from_dir, tool_versions

    import_s = time.perf_counter() - started
    runs: dict[str, Any] = {}
    for backbone, folder in trained.items():
        with tempfile.TemporaryDirectory(prefix="export-cost-") as tmp:
            repo = args.repository or Path(tmp) / "repository"
            started = time.perf_counter()
            result = export_from_dir(folder, repo)
            wall_s = time.perf_counter() - started
            stages = stage_breakdown(folder, duration, Path(tmp))
        per_model = {
            m.name: {"seconds": m.seconds, "onnx_bytes": m.onnx_bytes, "max_abs_diff": m.max_abs_diff,
                     "keras_bytes": (folder / f"{m.name}.keras").stat().st_size, "version": m.version,
                     "ops": list(m.ops), **stages["models"][m.name]}
            for m in result.models
        }  # fmt: skip
        runs[backbone] = {"export_wall_s": wall_s, "models": per_model,
                          "load_keras_s": stages["load_keras_s"], "parity_inputs_s": stages["parity_inputs_s"],
                          "trained": str(folder)}  # fmt: skip

    total = {b: sum(m["seconds"] for m in r["models"].values()) for b, r in runs.items()}
    ratios: dict[str, Any] = {
        b: {
            **{f"{n}_share_of_model_time": m["seconds"] / total[b] for n, m in r["models"].items()},
            **{f"{n}_onnx_vs_keras_bytes": m["onnx_bytes"] / m["keras_bytes"] for n, m in r["models"].items()},
            "model_time_share_of_wall": total[b] / r["export_wall_s"],
        }
        for b, r in runs.items()
    }
    if {"small", "vgg16"} <= runs.keys():
        ratios["vgg16_vs_small_export_wall"] = runs["vgg16"]["export_wall_s"] / runs["small"]["export_wall_s"]
    results = {
        "machine": {**machine(), **tool_versions()},
        "settings": {"duration_s": duration, "backbones": backbones, "notes": notes,
                     "repository": str(args.repository) if args.repository else "temporary"},
        "import_tensorflow_tf2onnx_s": import_s,
        "runs": runs,
        "ratios": ratios,
    }  # fmt: skip

    print(f"importing TensorFlow + tf2onnx: {import_s:.1f}s (paid once by every 'fusionserve export')")
    for b, r in runs.items():
        print(f"\n{b}: export_from_dir {r['export_wall_s']:.1f}s wall "
              f"(the three models {total[b]:.1f}s = {total[b] / r['export_wall_s']:.0%}; the rest loads the "
              ".keras files, builds the parity inputs and writes configs)")  # fmt: skip
        print(f"{'model':<14}{'export s':>9}{'share':>7} |{'convert':>8}{'gate':>7}{'write':>7}{'parity':>8}"
              f" |{'ONNX MB':>8}{'.keras MB':>10}{'ONNX/.keras':>12}{'max |Δ|':>9}")  # fmt: skip
        for n, m in r["models"].items():
            print(f"{n:<14}{m['seconds']:>9.2f}{m['seconds'] / total[b]:>7.0%} |{m['convert_s']:>8.2f}"
                  f"{m['gate_s']:>7.3f}{m['write_s']:>7.3f}{m['parity_s']:>8.2f} |{m['onnx_bytes'] / 1e6:>8.2f}"
                  f"{m['keras_bytes'] / 1e6:>10.2f}{m['onnx_bytes'] / m['keras_bytes']:>12.2f}"
                  f"{m['max_abs_diff']:>9.1e}")  # fmt: skip
        print(f"(stage columns: median of at least {min(m['repeats'] for m in r['models'].values())} repeat(s) "
              "after the export; loading the .keras files "
              f"{r['load_keras_s']:.1f}s, parity inputs {r['parity_inputs_s']:.1f}s)")  # fmt: skip
    if "vgg16_vs_small_export_wall" in ratios:
        print(f"\nvgg16 ÷ small export wall time: {ratios['vgg16_vs_small_export_wall']:.1f}×")
    name = result_name("export_cost", smoke=args.smoke)
    plot(runs, name)
    print("wrote", write(name, results))


def plot(runs: dict[str, Any], name: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    labels = [f"{b}\n{n}" for b, r in runs.items() for n in r["models"]]
    rows = [m for r in runs.values() for m in r["models"].values()]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.9 * len(rows) + 1.8))
    offset = [0.0] * len(rows)
    for stage in STAGES:
        widths = [m[f"{stage}_s"] for m in rows]
        left.barh(labels, widths, left=offset, label=stage)
        offset = [a + w for a, w in zip(offset, widths, strict=True)]
    left.set(xlabel="seconds (median per stage)", title="Export time per model, by stage")
    left.legend()
    left.invert_yaxis()
    right.barh(labels, [m["onnx_bytes"] / 1e6 for m in rows], label="ONNX")
    right.barh(labels, [m["keras_bytes"] / 1e6 for m in rows], height=0.3, label=".keras")
    right.set(xlabel="MB (log scale)", xscale="log", title="File size per model")
    right.legend()
    right.invert_yaxis()
    print("wrote", save_figure(fig, name))
    plt.close(fig)


if __name__ == "__main__":
    main()

"""The CUDA path's correctness: providers, parity with Keras per model, and CPU/CUDA label agreement.

Two steps, on two machines (the GPU machine has no TensorFlow):

    python bench/cuda_check.py reference --trained DIR --out REF.npz    # here: Keras' outputs
    python bench/cuda_check.py check --repository REPO --reference REF.npz [--vgg16-repository REPO]
    python bench/cuda_check.py --smoke      # CI: both steps on the CPU with the bench's smoke models

``reference`` runs the trained Keras models (``DIR`` as ``fusionserve train`` wrote it) on held-out
generated samples, preprocessed as the server does, and saves inputs and outputs. ``check`` runs
each exported model of ``REPO`` (exported from ``DIR``) on those inputs with onnxruntime, on the CPU
and on CUDA under several provider option sets, and prints the largest difference from Keras per
model and option set; for the ``vgg16`` backbone (random weights: no Keras reference) it compares
CUDA with the CPU. Then it serves ``REPO`` with ``--device cpu`` and ``--device cuda`` and compares
their labels on the demo's 200 held-out pairs. Writes bench/results/cuda-check.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import CUDA, RESULTS, OrtModel, ServerProcess, machine, onnx_path, repository, trained_models, write

from fusionserve.preprocess import ImagePreprocessing, Vocabulary

MODELS = ("image_encoder", "text_encoder", "fusion")
SAMPLES = 64
SEED = 2_000_003  # held out: neither the training nor the export parity samples
DEMO_PAIRS, DEMO_SEED = 200, 777  # what `fusionserve demo` classifies through the server
TOLERANCE = 1e-4  # the export parity gate's
# CUDA provider option sets compared (each over the server's defaults).
OPTION_SETS: dict[str, dict[str, str]] = {
    "server defaults (HEURISTIC, TF32 off)": {},
    "EXHAUSTIVE, TF32 off": {"cudnn_conv_algo_search": "EXHAUSTIVE"},
    "HEURISTIC, TF32 on": {"use_tf32": "1"},
    "EXHAUSTIVE, TF32 on (onnxruntime's defaults)": {"cudnn_conv_algo_search": "EXHAUSTIVE", "use_tf32": "1"},
}


def reference(trained: Path, out: Path) -> None:
    """Keras' outputs on held-out samples, with the inputs, into one .npz file."""
    import keras

    from fusionserve.export.convert import parity_inputs

    models = {name: keras.models.load_model(trained / f"{name}.keras", compile=False) for name in MODELS}
    size = int(models["image_encoder"].inputs[0].shape[1]), int(models["image_encoder"].inputs[0].shape[2])
    vocab = Vocabulary.load(trained / "vocab.json")
    images, tokens = parity_inputs(ImagePreprocessing(*size), vocab, SAMPLES, seed=SEED)
    image_features = np.asarray(models["image_encoder"](images))
    text_features = np.asarray(models["text_encoder"](tokens))
    probabilities = np.asarray(models["fusion"]([image_features, text_features]))
    np.savez_compressed(out, image=images, tokens=tokens, image_features=image_features,
                        text_features=text_features, probabilities=probabilities)  # fmt: skip
    print(f"wrote {out}: Keras outputs of {SAMPLES} held-out samples")


def _feeds(ref: Any) -> dict[str, dict[str, np.ndarray]]:
    return {
        "image_encoder": {"image": ref["image"]},
        "text_encoder": {"tokens": ref["tokens"]},
        "fusion": {"image_features": ref["image_features"], "text_features": ref["text_features"]},
    }


def parity(repo: Path, ref: Any, device: str) -> dict[str, Any]:
    """Max |onnxruntime - Keras| per model: CPU, then (on ``cuda``) CUDA under each option set."""
    want = {"image_encoder": ref["image_features"], "text_encoder": ref["text_features"],
            "fusion": ref["probabilities"]}  # fmt: skip
    out: dict[str, Any] = {}
    for name, feeds in _feeds(ref).items():
        path = onnx_path(repo, name)
        cpu = OrtModel(path, device="cpu")
        row: dict[str, Any] = {"cpu": _max_diff(cpu.run(feeds)[0], want[name])}
        row["providers"] = cpu.session.get_providers()
        for label, options in OPTION_SETS.items() if device == "cuda" else ():
            model = OrtModel(path, device="cuda", io_binding=False, cuda_options=options)
            row["providers"] = model.session.get_providers()
            row[label] = _max_diff(model.run(feeds)[0], want[name])
        out[name] = row
    return out


def vgg16_cuda_vs_cpu(repo: Path, batch: int = 8) -> dict[str, Any]:
    """The vgg16 image encoder (random weights): max |CUDA - CPU| per option set."""
    path = onnx_path(repo, "image_encoder")
    cpu = OrtModel(path, device="cpu", threads=0)
    shape = cpu.session.get_inputs()[0].shape
    images = np.random.default_rng(0).random((batch, int(shape[1]), int(shape[2]), 3), np.float32)
    expected = cpu.run({"image": images})[0]
    out: dict[str, Any] = {"batch": batch, "output_abs_max": float(np.abs(expected).max())}
    for label, options in OPTION_SETS.items():
        model = OrtModel(path, device="cuda", io_binding=False, cuda_options=options)
        out[label] = _max_diff(model.run({"image": images})[0], expected)
        out.setdefault("providers", model.session.get_providers())
    return out


def _max_diff(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))


def labels(repo: Path, device: str) -> dict[str, Any]:
    """Serve the demo's held-out pairs on the CPU and on ``device``, and compare the labels."""
    from fusionserve import data
    from fusionserve.client import FusionClient
    from fusionserve.preprocess import encode_png

    ds = data.generate(DEMO_PAIRS, seed=DEMO_SEED)
    items = [(encode_png(img), cap) for img, cap in zip(ds.images, ds.captions, strict=True)]
    answers: dict[str, Any] = {}
    for run, run_device in (("cpu", "cpu"), ("cuda", device)):
        started = time.perf_counter()
        with ServerProcess(repo, "--device", run_device, start_timeout_s=300) as server:
            ready_s = time.perf_counter() - started
            with FusionClient(server.target, timeout_s=60) as client:
                models = {m.name: list(m.execution_providers) for m in client.models()}
                results = [r for i in range(0, DEMO_PAIRS, 50) for r in client.classify_batch(items[i : i + 50])]
        answers[run] = {"ready_s": ready_s, "providers": models, "labels": [r.label for r in results],
                           "probabilities": np.array([r.probabilities for r in results])}  # fmt: skip
    cpu, cuda = answers["cpu"], answers["cuda"]
    truth = [data.LABELS[t] for t in ds.labels]
    return {
        "pairs": DEMO_PAIRS,
        "same_labels": sum(a == b for a, b in zip(cpu["labels"], cuda["labels"], strict=True)),
        "max_probability_diff": _max_diff(cuda["probabilities"], cpu["probabilities"]),
        "accuracy_cpu": sum(a == t for a, t in zip(cpu["labels"], truth, strict=True)) / DEMO_PAIRS,
        "accuracy_cuda": sum(a == t for a, t in zip(cuda["labels"], truth, strict=True)) / DEMO_PAIRS,
        "providers_cuda": cuda["providers"],
        "ready_s": {"cpu": cpu["ready_s"], "cuda": cuda["ready_s"]},
    }


def check(repo: Path, reference_file: Path, vgg16: Path | None, device: str, result: str) -> None:
    results: dict[str, Any] = {"machine": machine(), "device": device, "tolerance": TOLERANCE,
                               "option_sets": OPTION_SETS}  # fmt: skip
    with np.load(reference_file) as ref:
        results["parity"] = parity(repo, ref, device)
    print(f"max |onnxruntime - Keras| on {SAMPLES} held-out samples (export tolerance {TOLERANCE:g})")
    columns = ["cpu", *(OPTION_SETS if device == "cuda" else ())]
    print(f"{'model':<15}" + "".join(f"{c[:22]:>24}" for c in columns))
    for name, row in results["parity"].items():
        print(f"{name:<15}" + "".join(f"{row[c]:>24.2e}" for c in columns))
    bad = [name for name, row in results["parity"].items() if row["providers"][0] != CUDA]
    print(f"every model's session starts with {CUDA}:", not bad, bad or "")
    if vgg16 is not None and device == "cuda":
        v = results["vgg16_cuda_vs_cpu"] = vgg16_cuda_vs_cpu(vgg16)
        print(f"\nvgg16 image encoder, max |CUDA - CPU| (batch {v['batch']}, outputs up to {v['output_abs_max']:.2f}): "
              + ", ".join(f"{k}: {v[k]:.2e}" for k in OPTION_SETS))  # fmt: skip
    results["labels"] = lab = labels(repo, device)
    print(f"\ndemo's {lab['pairs']} held-out pairs, served --device cpu vs --device {device}: {lab['same_labels']} "
          f"same labels, max probability difference {lab['max_probability_diff']:.2e}, accuracy "
          f"{lab['accuracy_cpu']:.3f} / {lab['accuracy_cuda']:.3f}; ready after {lab['ready_s']['cpu']:.1f} s / "
          f"{lab['ready_s']['cuda']:.1f} s; CUDA server providers {lab['providers_cuda']}")  # fmt: skip
    print("wrote", write(result, results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CI: reference + check on the CPU (no claims)")
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("reference", help="Keras outputs on held-out samples (needs TensorFlow)")
    p.add_argument("--trained", type=Path, required=True, help="folder written by 'fusionserve train'")
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("check", help="parity and labels on CUDA (needs a GPU)")
    p.add_argument("--repository", type=Path, required=True, help="exported from the --trained folder")
    p.add_argument("--reference", type=Path, required=True)
    p.add_argument("--vgg16-repository", type=Path)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    args = parser.parse_args()
    if args.smoke:
        ref = RESULTS / "cuda-check-reference-smoke.npz"
        reference(trained_models(smoke=True), ref)
        check(repository(smoke=True), ref, None, "cpu", "cuda-check-smoke")
    elif args.command == "reference":
        reference(args.trained, args.out)
    elif args.command == "check":
        check(args.repository, args.reference, args.vgg16_repository, args.device, f"cuda-check-{args.device}")
    else:
        parser.error("give a command (reference or check) or --smoke")


if __name__ == "__main__":
    main()

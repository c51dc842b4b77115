"""Models described the Triton way over V2: tensor metadata, ``ModelConfig`` and ``ModelStatistics``.

perf_analyzer and tritonclient read these to build their requests and reports (the
``model_configuration`` and ``statistics`` extensions).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fusionserve.errors import ModelNotReadyError
from fusionserve.server.model_totals import ModelTotals
from fusionserve.server.registry import ModelEntry
from fusionserve.v2 import grpc_service_pb2 as pb
from fusionserve.v2 import model_config_pb2 as mc


def input_shape(shape: Sequence[int]) -> list[int]:
    """The shape an input is described with: one value per batch row (``[-1]``) is ``[-1, 1]``.

    That is Triton's form for such a tensor (``dims: [1]`` in its model configuration, where dims may
    not be empty), and perf_analyzer builds its requests from it. ``v2_requests.decode_inputs`` takes
    both ``[n, 1]`` and ``[n]``, so clients written against either form work.
    """
    return [*shape, 1] if len(shape) == 1 else list(shape)


def tensor_metadata(specs: Sequence[Any], *, inputs: bool = False) -> list[pb.ModelMetadataResponse.TensorMetadata]:
    """Describe a model's TensorSpecs as TensorMetadata messages (``inputs``: see :func:`input_shape`)."""
    return [
        pb.ModelMetadataResponse.TensorMetadata(
            name=t.name, datatype=t.datatype, shape=input_shape(t.shape) if inputs else t.shape
        )
        for t in specs
    ]


def _config_datatype(datatype: str) -> int:
    """A V2 datatype as Triton's model configuration names it (BYTES is TYPE_STRING there)."""
    return int(mc.DataType.Value("TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"))


def _set_dims(tensor: mc.ModelInput | mc.ModelOutput, shape: Sequence[int], max_batch: int) -> None:
    """Triton's dims: the shape without its batch dimension when the model batches.

    A tensor of one value per batch row (shape ``[-1]``) is ``dims: [1]`` with ``reshape: []``, as in
    Triton, where dims may not be empty: clients send ``[n, 1]``, which ``v2_requests.decode_inputs``
    takes as ``[n]``.
    """
    if max_batch <= 0:
        tensor.dims.extend(shape)
    elif len(shape) == 1:
        tensor.dims.append(1)
        tensor.reshape.SetInParent()
    else:
        tensor.dims.extend(shape[1:])


def model_config(entry: ModelEntry) -> mc.ModelConfig:
    """Triton's ``ModelConfig`` for a loaded model: tensors without the batch dimension, batching settings."""
    if entry.config is None:
        raise ModelNotReadyError(f"model {entry.name!r} v{entry.version} is {entry.state}: {entry.reason}")
    config = entry.config
    max_batch = entry.max_batch_size
    out = mc.ModelConfig(
        name=entry.name,
        platform=config.platform,
        backend="onnxruntime" if entry.model is not None else "fusionserve",
        max_batch_size=max_batch,
        default_model_filename=config.model_file or "",
    )
    for spec in config.inputs:
        tensor = out.input.add(name=spec.name, data_type=_config_datatype(spec.datatype))
        _set_dims(tensor, spec.shape, max_batch)
    for spec in config.outputs:
        tensor = out.output.add(name=spec.name, data_type=_config_datatype(spec.datatype))
        _set_dims(tensor, spec.shape, max_batch)
    if entry.batcher is not None:
        out.dynamic_batching.max_queue_delay_microseconds = round(entry.batcher.max_queue_delay_s * 1e6)
    return out


def model_statistics(entry: ModelEntry, totals: ModelTotals | None) -> pb.ModelStatistics:
    """Triton's ``ModelStatistics`` from the running totals of ``entry``'s model (zeros when unused)."""
    t = totals or ModelTotals()
    stats = pb.ModelStatistics(
        name=entry.name,
        version=str(entry.version),
        last_inference=t.last_inference_ms,
        inference_count=t.inference_count,
        execution_count=t.execution_count,
    )
    s = stats.inference_stats
    s.success.count, s.success.ns = t.success_count, t.success_ns
    s.fail.count, s.fail.ns = t.fail_count, t.fail_ns
    s.queue.count, s.queue.ns = t.queue_count, t.queue_ns
    s.cache_hit.count, s.cache_hit.ns = t.cache_hit_count, t.cache_hit_ns
    s.cache_miss.count, s.cache_miss.ns = t.cache_miss_count, t.cache_miss_ns
    # One onnxruntime run covers input, inference and output: its time is all in compute_infer, and
    # compute_input/compute_output carry the same count with 0 ns (clients check the counts agree).
    for part in (s.compute_input, s.compute_infer, s.compute_output):
        part.count = t.execution_count
    s.compute_infer.ns = t.compute_ns
    for rows, (count, ns) in sorted(t.by_batch_size.items()):
        batch = stats.batch_stats.add(batch_size=rows)
        for part in (batch.compute_input, batch.compute_infer, batch.compute_output):
            part.count = count
        batch.compute_infer.ns = ns
    return stats



"""onnxruntime sessions: provider choice (CUDA or CPU), session options and the run call."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from fusionserve.errors import InvalidInputError, RepositoryError
from fusionserve.repository import ModelConfig

logger = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_cuda_loads: bool | None = None  # learnt from the first session that asks for CUDA


class DeviceUnavailableError(RuntimeError):
    """``--device cuda`` was asked for and the CUDA execution provider does not load."""


def providers_for(device: str) -> list[str]:
    """Execution providers to ask for, in order of preference."""
    if device == "cpu" or (device == "auto" and _cuda_loads is False):
        return [CPU]
    available = ort.get_available_providers()
    if CUDA not in available:
        if device == "cuda":
            raise DeviceUnavailableError(
                f"--device cuda: onnxruntime offers no {CUDA} (available: {available}); "
                "install onnxruntime-gpu with CUDA 13 and cuDNN 9, or use --device auto/cpu"
            )
        return [CPU]
    return [CUDA, CPU]


class OnnxModel:
    """One ONNX model version in one onnxruntime session. ``run`` is thread-safe and blocking."""

    def __init__(
        self,
        config: ModelConfig,
        path: Path,
        *,
        device: str = "auto",
        intra_op_threads: int = 1,
        inter_op_threads: int = 1,
        graph_optimization_level: str = "all",
        io_binding: bool = True,
    ) -> None:
        global _cuda_loads
        self.config = config
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = inter_op_threads
        options.graph_optimization_level = _OPT_LEVELS[graph_optimization_level]
        # Spinning threads burn the cores the other sessions and the event loop need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        wanted = providers_for(device)
        probing = device == "auto" and wanted[0] == CUDA and _cuda_loads is None
        if probing:
            # onnxruntime logs several lines when CUDA libraries are missing; we log one instead.
            ort.set_default_logger_severity(4)
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=wanted)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise RepositoryError(f"{path}: onnxruntime cannot load the model: {e}") from e
        finally:
            if probing:
                ort.set_default_logger_severity(2)
        self.providers: list[str] = self.session.get_providers()
        if wanted[0] == CUDA:
            loaded = self.providers[0] == CUDA
            if not loaded and device == "cuda":
                raise DeviceUnavailableError(
                    f"{config.name}: --device cuda, but the CUDA execution provider did not load "
                    "(CUDA 13 and cuDNN 9 libraries must be on the library path)"
                )
            if probing:
                _cuda_loads = loaded
                if not loaded:
                    logger.warning("CUDA execution provider did not load; falling back to CPU for every model")
        self._check_io(path)
        self._output_names = [t.name for t in config.outputs]
        self._use_binding = io_binding and self.providers[0] == CUDA

    def _check_io(self, path: Path) -> None:
        """The ONNX graph's inputs/outputs must be the ones the config promises."""
        graph_inputs = {i.name for i in self.session.get_inputs()}
        graph_outputs = {o.name for o in self.session.get_outputs()}
        declared_in = {t.name for t in self.config.inputs}
        declared_out = {t.name for t in self.config.outputs}
        if graph_inputs != declared_in or not declared_out <= graph_outputs:
            raise RepositoryError(
                f"{path}: graph inputs {sorted(graph_inputs)} / outputs {sorted(graph_outputs)} do not match "
                f"config inputs {sorted(declared_in)} / outputs {sorted(declared_out)}"
            )

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch; inputs and outputs are keyed by tensor name.

        Raises:
            InvalidInputError: onnxruntime refused the values (names, types and shapes were checked
                before, so this is about content, e.g. a token id outside the embedding's range).
        """
        try:
            return self._run(inputs)
        except InvalidArgument as e:
            detail = str(e).splitlines()[0] if str(e) else type(e).__name__
            message = f"model {self.config.name!r}: onnxruntime rejected the input values: {detail}"
            raise InvalidInputError(message) from e

    def _run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._use_binding:
            binding = self.session.io_binding()
            for name, value in inputs.items():
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
            for name in self._output_names:
                binding.bind_output(name, "cpu")
            self.session.run_with_iobinding(binding)
            return dict(zip(self._output_names, binding.copy_outputs_to_cpu(), strict=True))
        return dict(zip(self._output_names, self.session.run(self._output_names, dict(inputs)), strict=True))

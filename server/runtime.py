"""onnxruntime sessions: provider choice (CUDA or CPU), provider and session options, the run call.

CUDA needs onnxruntime-gpu plus the CUDA 13 and cuDNN 9 libraries. ``pip install "fusionserve[cuda]"``
brings those libraries as NVIDIA's pip packages; :func:`cuda_unavailable_reason` loads them
(``onnxruntime.preload_dlls``) before the first CUDA session and says, in one line, what is missing
when the provider still cannot load (the first library the dynamic loader did not find, say).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.util
import io
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from fusionserve.errors import DeviceUnavailableError, InvalidInputError, RepositoryError
from fusionserve.repository import ONNX_TYPES, ModelConfig

logger = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_CUDA_HELP = "pip install 'fusionserve[cuda]' (CUDA 13 + cuDNN 9 libraries) and an NVIDIA driver"
_cuda_loads: bool | None = None  # learnt from the first session that asks for CUDA
_fallback_logged = False


@functools.lru_cache(maxsize=1)
def cuda_unavailable_reason() -> str | None:
    """None when onnxruntime's CUDA provider library loads in this process, else why not (one line).

    Loads the NVIDIA pip libraries first when they are installed (the ``cuda`` extra). A driver
    that is missing or too old shows only when the first session starts (see OnnxModel).
    """
    if CUDA not in ort.get_available_providers():
        return f"this onnxruntime ({ort.__version__}) has no {CUDA}; {_CUDA_HELP}"
    if importlib.util.find_spec("nvidia") is not None and hasattr(ort, "preload_dlls"):
        with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per library it cannot find
            ort.preload_dlls()
    library = Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    if library.is_file():  # Linux; elsewhere the first session tells
        # The provider library needs CUDA and the driver (libcuda.so.1) to load; cuDNN it opens later.
        for name in (str(library), "libcudnn.so.9"):
            try:
                ctypes.CDLL(name)
            except OSError as e:
                return f"{e}; {_CUDA_HELP}"
    return None


def providers_for(device: str, cuda_options: Mapping[str, str] | None = None) -> list:
    """Execution providers to ask for, in order of preference (CUDA with its options first).

    Raises:
        DeviceUnavailableError: ``device`` is ``cuda`` and the CUDA provider cannot load here.
    """
    if device == "cpu" or (device == "auto" and _cuda_loads is False):
        return [CPU]
    reason = cuda_unavailable_reason()
    if reason is not None:
        if device == "cuda":
            raise DeviceUnavailableError(f"--device cuda: the CUDA execution provider cannot load: {reason}")
        global _fallback_logged
        if not _fallback_logged:
            logger.warning("CUDA execution provider unavailable, serving on CPU: %s", reason)
            _fallback_logged = True
        return [CPU]
    return [(CUDA, dict(cuda_options or {})), CPU]


class OnnxModel:
    """One ONNX model version in one onnxruntime session. ``run`` is thread-safe and blocking."""

    def __init__(
        self,
        config: ModelConfig,
        path: Path,
        *,
        device: str = "auto",
        cuda_options: Mapping[str, str] | None = None,
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
        wanted = providers_for(device, cuda_options)
        on_cuda = wanted[0] != CPU
        probing = device == "auto" and on_cuda and _cuda_loads is None
        if probing:
            # onnxruntime logs several lines when the GPU cannot be used; we log one instead.
            ort.set_default_logger_severity(4)
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=wanted)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            if on_cuda and device == "cuda" and "CUDA" in str(e):
                raise DeviceUnavailableError(f"--device cuda: {config.name}: {str(e).splitlines()[0]}") from e
            raise RepositoryError(f"{path}: onnxruntime cannot load the model: {e}") from e
        finally:
            if probing:
                ort.set_default_logger_severity(2)
        self.providers: list[str] = self.session.get_providers()
        if on_cuda:
            loaded = self.providers[0] == CUDA
            if not loaded and device == "cuda":
                raise DeviceUnavailableError(
                    f"--device cuda: {config.name}: the CUDA execution provider did not start (no GPU or driver?)"
                )
            if probing:
                _cuda_loads = loaded
                if not loaded:
                    logger.warning("CUDA execution provider did not start (no GPU or driver?); serving on CPU")
        self._check_io(path)
        self._output_names = [t.name for t in config.outputs]
        self._use_binding = io_binding and self.providers[0] == CUDA

    @property
    def on_cuda(self) -> bool:
        """True when the session runs on the CUDA execution provider."""
        return self.providers[0] == CUDA

    def provider_options(self) -> dict[str, dict[str, str]]:
        """The options each provider really runs with (onnxruntime fills in its defaults)."""
        return self.session.get_provider_options()

    def _check_io(self, path: Path) -> None:
        """The ONNX graph's inputs/outputs must be the ones the config promises: names, types, fixed sizes."""
        graph_inputs = {i.name: i for i in self.session.get_inputs()}
        graph_outputs = {o.name: o for o in self.session.get_outputs()}
        declared_in = {t.name for t in self.config.inputs}
        declared_out = {t.name for t in self.config.outputs}
        if set(graph_inputs) != declared_in or not declared_out <= set(graph_outputs):
            raise RepositoryError(
                f"{path}: graph inputs {sorted(graph_inputs)} / outputs {sorted(graph_outputs)} do not match "
                f"config inputs {sorted(declared_in)} / outputs {sorted(declared_out)}"
            )
        for spec, arg in [*((t, graph_inputs[t.name]) for t in self.config.inputs),
                          *((t, graph_outputs[t.name]) for t in self.config.outputs)]:  # fmt: skip
            datatype = ONNX_TYPES.get(arg.type)
            dims = [d if isinstance(d, int) and d > 0 else -1 for d in arg.shape]
            fixed_clash = len(dims) != len(spec.shape) or any(
                g != -1 and c != -1 and g != c for g, c in zip(dims, spec.shape, strict=False)
            )
            if datatype != spec.datatype or fixed_clash:
                raise RepositoryError(
                    f"{path}: tensor {spec.name!r} is {datatype or arg.type} {dims} in the graph but "
                    f"{spec.datatype} {list(spec.shape)} in the config"
                )

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch; inputs and outputs are keyed by tensor name.

        Raises:
            InvalidInputError: onnxruntime refused the values (names, types and shapes were checked
                before, so this is about content).
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

"""`fusionserve serve` as a real process: start, serve, SIGTERM → drain → exit 0; settings precedence."""

from __future__ import annotations

import json
import subprocess
import sys

import grpc
import pytest

from fusionserve.server.process import ServerNotStarted
from fusionserve.server.settings import ServerSettings
from fusionserve.v1 import fusion_pb2 as pb
from fusionserve.v1 import fusion_pb2_grpc as pb_grpc
from tests.processes import ServerProcess


@pytest.mark.slow
def test_sigterm_drains_and_exits_zero(repository, samples):
    server = ServerProcess(repository, "--shutdown-grace-s", "5")
    try:
        stub = pb_grpc.FusionServiceStub(grpc.insecure_channel(server.target))
        response = stub.Classify(pb.ClassifyRequest(items=[pb.Item(image=samples[0][0], text=samples[0][1])]))
        assert response.results[0].label in ("match", "mismatch")
        server.terminate()
        assert server.wait(30) == 0
        server.close()  # reads the log to its end
        assert "shut down" in "".join(server.log)
    finally:
        server.close()


def _cuda_works() -> bool:
    from fusionserve.server.runtime import cuda_unavailable_reason

    return cuda_unavailable_reason() is None


def test_device_cuda_without_cuda_is_one_clear_line_and_exit_2(repository):
    if _cuda_works():
        pytest.skip("this machine's CUDA provider loads")
    result = subprocess.run(
        [sys.executable, "-m", "fusionserve", "serve", "--repository", str(repository), "--port", "0",
         "--metrics-port", "-1", "--device", "cuda"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--device cuda: the CUDA execution provider cannot load" in lines[0], lines


def test_auto_falls_back_to_cpu_naming_what_is_missing(repository):
    import onnxruntime

    if _cuda_works() or "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("needs onnxruntime-gpu on a machine where its CUDA libraries are missing")
    with ServerProcess(repository, "--device", "auto") as server:
        log = "".join(server.log)
    assert log.count("CUDA execution provider unavailable, serving on CPU") == 1, log
    assert "cannot open shared object file" in log and "fusionserve[cuda]" in log


def test_serve_without_a_repository_is_a_clear_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "fusionserve", "serve", "--repository", str(tmp_path / "missing"), "--port", "0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "is not a directory" in result.stderr


def test_settings_precedence_defaults_file_env_flags(tmp_path):
    config = tmp_path / "server.json"
    config.write_text(json.dumps({"max_queue_delay_ms": 5, "port": 9000, "max_queue_size": 10}))
    env = {"FUSIONSERVE_PORT": "9100", "FUSIONSERVE_MAX_QUEUE_SIZE": "20", "FUSIONSERVE_SERVICE_HOST": "ignored"}
    settings = ServerSettings.load(config, env=env, overrides={"port": 9200, "device": None})
    assert settings.max_queue_delay_ms == 5.0  # file over default
    assert settings.max_queue_size == 20  # env over file
    assert settings.port == 9200  # flag over env
    assert settings.device == "auto"  # None flag leaves it alone
    with pytest.raises(ValueError, match="unknown setting"):
        ServerSettings.load(None, env={}, overrides={"nope": 1})
    with pytest.raises(ValueError, match="device"):
        ServerSettings.load(None, env={"FUSIONSERVE_DEVICE": "tpu"})


@pytest.mark.gpu
def test_cuda_device_serves_every_model_on_the_gpu(repository, samples):
    if not _cuda_works():
        pytest.skip("no working CUDA execution provider on this machine")
    from tests.serving import RunningServer

    with RunningServer(repository, device="cuda", metrics_port=-1) as srv:
        stub = pb_grpc.FusionServiceStub(srv.channel())
        for model in stub.ListModels(pb.ListModelsRequest()).models:
            assert model.execution_providers[0] == "CUDAExecutionProvider", model.name
        items = [pb.Item(image=img, text=text) for img, text in samples[:16]]
        assert len(stub.Classify(pb.ClassifyRequest(items=items)).results) == 16


def test_a_bad_environment_value_names_the_setting_and_variable():
    with pytest.raises(ValueError, match="FUSIONSERVE_PORT.*tcp://10.0.0.1:8001"):
        ServerSettings.load(None, env={"FUSIONSERVE_PORT": "tcp://10.0.0.1:8001"})


def test_server_process_that_cannot_start_raises_with_the_servers_own_message(tmp_path):
    """The shared launcher (demo, bench, tests) reports why, from the server's log, and leaves no child."""
    with pytest.raises(ServerNotStarted, match="is not a directory") as caught:
        ServerProcess(tmp_path / "missing")
    assert "fusionserve serve" in str(caught.value)


def test_cuda_settings_become_onnxruntime_provider_options():
    settings = ServerSettings.load(None, env={"FUSIONSERVE_CUDA_TF32": "true", "FUSIONSERVE_CUDA_MEM_LIMIT_MB": "512"},
                                   overrides={"cuda_conv_algo_search": "EXHAUSTIVE"})  # fmt: skip
    assert settings.cuda_provider_options() == {
        "device_id": "0", "cudnn_conv_algo_search": "EXHAUSTIVE", "use_tf32": "1",
        "arena_extend_strategy": "kSameAsRequested", "gpu_mem_limit": str(512 * 1024 * 1024),
    }  # fmt: skip
    assert "gpu_mem_limit" not in ServerSettings().cuda_provider_options()  # 0: no cap
    with pytest.raises(ValueError, match="cuda_conv_algo_search must be"):
        ServerSettings.load(None, env={}, overrides={"cuda_conv_algo_search": "FAST"})

"""deploy/monitoring with the real Prometheus tools: the rules, their unit tests, and the dashboard's queries.

``promtool check rules`` and ``promtool test rules`` (every alert has series that make it fire and
series that keep it quiet), then a real Prometheus server scraping ``fusionserve serve --workers 2``
under load, with the rules loaded: every panel query of the Grafana dashboard must answer, with data,
and the alerts must see what the server exports (a model that fails to load makes its alert fire).

Debian's ``prometheus`` package brings both binaries. Without them these tests skip, unless
``FUSIONSERVE_REQUIRE_PROMETHEUS`` is set (as ``.ci/run`` does), where they fail.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml

from fusionserve.client import FusionClient, FusionClientError
from fusionserve.preprocess import encode_png
from fusionserve.server.prometheus_process import PrometheusProcess, dashboard_queries
from fusionserve.v1 import fusion_pb2 as fusion
from fusionserve.v1 import fusion_pb2_grpc as fusion_grpc
from fusionserve.v2 import grpc_service_pb2 as v2
from fusionserve.v2 import grpc_service_pb2_grpc as v2_grpc
from tests.processes import ServerProcess, wait_until

MONITORING = Path(__file__).resolve().parent.parent / "deploy" / "monitoring"
RULES = MONITORING / "fusionserve.rules.yml"
RULE_TESTS = MONITORING / "fusionserve.rules.test.yml"
DASHBOARD = MONITORING / "fusionserve-dashboard.json"
VARIABLES = {"job": ".*", "model": ".*", "datasource": "prometheus", "__rate_interval": "10s"}


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (apt-get install prometheus)"
        if os.environ.get("FUSIONSERVE_REQUIRE_PROMETHEUS"):
            pytest.fail(message + ", and FUSIONSERVE_REQUIRE_PROMETHEUS says it must be")
        pytest.skip(message)
    return path


def alerts() -> dict[str, dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"] if "alert" in rule}


def test_promtool_checks_the_rules():
    done = subprocess.run([tool("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_unit_tests_of_the_rules_pass():
    done = subprocess.run([tool("promtool"), "test", "rules", str(RULE_TESTS)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_has_a_case_that_fires_it_and_one_that_keeps_it_quiet():
    cases = [check for test in yaml.safe_load(RULE_TESTS.read_text())["tests"] for check in test["alert_rule_test"]]
    for name in alerts():
        mine = [case for case in cases if case["alertname"] == name]
        assert any(case.get("exp_alerts") for case in mine), f"nothing makes {name} fire"
        assert any(not case.get("exp_alerts") for case in mine), f"nothing shows {name} stays quiet"
    assert {case["alertname"] for case in cases} <= set(alerts())


def test_the_dashboard_is_grafana_json_whose_panels_all_query_prometheus():
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    assert {v["name"] for v in dashboard["templating"]["list"]} == {"datasource", "job", "model"}
    for panel in panels:
        assert panel["targets"], panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
    titles = " ".join(p["title"] for p in panels).lower()
    for topic in ("throughput", "latency", "batch size", "queue time", "cache hit", "refusals", "version"):
        assert topic in titles, topic


@pytest.fixture(scope="module")
def repository_with_a_broken_model(repository, tmp_path_factory) -> Path:
    """The tiny repository plus a model ``broken`` whose ONNX file does not match its config's hash."""
    repo = tmp_path_factory.mktemp("monitored") / "repo"
    shutil.copytree(repository, repo)
    shutil.copytree(repo / "fusion" / "1", repo / "broken" / "1")
    config = json.loads((repo / "broken" / "1" / "config.json").read_text())
    (repo / "broken" / "1" / "config.json").write_text(json.dumps({**config, "name": "broken"}))
    onnx = repo / "broken" / "1" / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-64] + b"\0" * 64)
    return repo


def _load(server: ServerProcess, samples, stop: threading.Event, errors: list[BaseException]) -> list[threading.Thread]:
    """Traffic of every kind the dashboard shows, until ``stop``: cached and new items, refusals, failures."""

    def callers() -> None:
        with FusionClient(server.target, connections=4, timeout_s=20) as client:
            i = 0
            while not stop.is_set():
                image, text = samples[i % 48]  # repeats: cache hits; the first pass: misses
                try:
                    client.classify(image, text)
                except FusionClientError as e:
                    if e.code != grpc.StatusCode.RESOURCE_EXHAUSTED:  # refused under load is expected
                        errors.append(e)
                i += 1

    def odd_calls() -> None:
        with grpc.insecure_channel(server.target) as channel, FusionClient(server.target) as client:
            stub = v2_grpc.GRPCInferenceServiceStub(channel)
            typed = fusion_grpc.FusionServiceStub(channel)
            image, text = samples[0]
            burst = fusion.ClassifyRequest(items=[fusion.Item(image=image, text=text)])
            rng = np.random.default_rng(0)
            while not stop.wait(0.2):
                # Four calls of 64 images no cache has seen (no deadline), then 32 calls at once, each
                # with 30 ms to live: the door refuses those behind more work than that
                # (RESOURCE_EXHAUSTED, reason deadline), the refusals the dashboard shows.
                backlog = [typed.Classify.future(fusion.ClassifyRequest(items=[
                    fusion.Item(image=encode_png(rng.integers(0, 256, (64, 64, 3), np.uint8)), text=text)
                    for _ in range(64)
                ]), timeout=20) for _ in range(4)]  # fmt: skip
                time.sleep(0.01)  # the backlog is admitted first
                for future in [typed.Classify.future(burst, timeout=0.03) for _ in range(32)] + backlog:
                    try:
                        future.result()
                    except grpc.RpcError as e:
                        if e.code() not in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED):
                            errors.append(e)
                for call, code in ((lambda: stub.ModelInfer(v2.ModelInferRequest(model_name="broken")),
                                    grpc.StatusCode.UNAVAILABLE),
                                   (lambda: client.classify(b"not an image", "text"),
                                    grpc.StatusCode.INVALID_ARGUMENT)):  # fmt: skip
                    try:
                        call()
                        errors.append(AssertionError(f"expected {code}"))
                    except grpc.RpcError as e:
                        assert e.code() == code, e
                    except FusionClientError as e:
                        assert e.code == code, e

    threads = [threading.Thread(target=f, daemon=True) for f in (callers, callers, odd_calls)]
    for t in threads:
        t.start()
    return threads


def scrapes(prometheus: PrometheusProcess) -> int:
    """Scrapes of the server in the last 30 s."""
    result = prometheus.query("count_over_time(up[30s])")
    return int(float(result[0]["value"][1])) if result else 0


def test_prometheus_scraping_a_loaded_server_answers_every_dashboard_query_and_evaluates_the_rules(
    repository_with_a_broken_model, samples
):
    tool("prometheus")
    with ServerProcess(repository_with_a_broken_model, "--workers", "2", metrics_port=0) as server:
        assert server.metrics_url is not None
        target = server.metrics_url.removeprefix("http://").removesuffix("/metrics")
        with PrometheusProcess([target], rule_files=[RULES]) as prometheus:
            stop, errors = threading.Event(), []
            threads = _load(server, samples, stop, errors)
            try:
                prometheus.wait_for_targets()
                # Ten scrapes of load: every rate window of the panels (10 s) holds several samples.
                assert wait_until(lambda: scrapes(prometheus) >= 10, 60)
                empty = []
                for title, legend, expr in dashboard_queries(DASHBOARD, VARIABLES):
                    if not prometheus.query(expr):  # a query Prometheus refuses raises here
                        empty.append(f"{title} ({legend}): {expr}")
                assert not empty, "dashboard queries with no data:\n" + "\n".join(empty)

                groups = prometheus.api("rules")["groups"]
                rules = [rule for group in groups for rule in group["rules"]]
                assert len(rules) == sum(len(g["rules"]) for g in yaml.safe_load(RULES.read_text())["groups"])
                assert all(rule["health"] == "ok" for rule in rules), [r for r in rules if r["health"] != "ok"]
                for rule in rules:
                    if rule["type"] == "recording":
                        assert prometheus.query(rule["name"]), f"recording rule {rule['name']} has no data"

                def firing(name: str) -> list[dict]:
                    return [a for a in prometheus.api("alerts")["alerts"] if a["labels"]["alertname"] == name]

                # The version that cannot load: its alert fires at once, the slower ones wait for their "for".
                assert wait_until(lambda: any(a["state"] == "firing" and a["labels"]["model"] == "broken"
                                              for a in firing("FusionserveModelLoadFailed")), 30)  # fmt: skip
                assert {a["labels"]["model"] for a in firing("FusionserveModelNotReady")} == {"broken"}
                # The bursts' 30 ms deadlines make some of multimodal's calls miss them on the server too.
                assert "broken" in {a["labels"]["model"] for a in firing("FusionserveServerErrors")}
                assert not firing("FusionserveWorkerRestarted") and not firing("FusionserveTargetDown")
            finally:
                stop.set()
                for t in threads:
                    t.join(30)
        assert not errors, errors[:3]
        assert server.close() == 0

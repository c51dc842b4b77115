"""A real Prometheus server as a child process scraping fusionserve, and a Grafana dashboard's queries run on it.

For the monitoring tests and the dashboard picture (``bench/dashboard.py``). Debian's ``prometheus``
package brings the binary (``apt-get install prometheus``); the server's files live in a
temporary folder removed on :meth:`PrometheusProcess.close`::

    with PrometheusProcess(["127.0.0.1:8002"], rule_files=[RULES]) as prometheus:
        prometheus.wait_for_targets()
        for panel, target, expr in dashboard_queries(DASHBOARD, {"job": ".*", "model": ".*"}):
            prometheus.query(expr)
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

JOB = "fusionserve"
"""The scrape job's name (the dashboard's ``$job``; the alert on unreachable targets matches it)."""


class PrometheusError(RuntimeError):
    """Prometheus did not start, or its HTTP API answered an error; the message holds its log or error."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrometheusProcess:
    """``prometheus`` on 127.0.0.1 scraping ``targets`` (``host:port``) every ``scrape_interval_s``.

    ``rule_files`` are loaded and evaluated as often as targets are scraped.
    """

    def __init__(self, targets: Sequence[str], *, rule_files: Sequence[Path] = (), scrape_interval_s: float = 1.0,
                 binary: str = "prometheus", start_timeout_s: float = 60) -> None:  # fmt: skip
        found = shutil.which(binary)
        if found is None:
            raise PrometheusError(f"no {binary!r} on PATH: apt-get install prometheus")
        self.folder = Path(tempfile.mkdtemp(prefix="fusionserve-prometheus-"))
        interval = f"{int(scrape_interval_s * 1000)}ms"
        config = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval, "scrape_timeout": interval},
            "rule_files": [str(Path(f).resolve()) for f in rule_files],
            "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": list(targets)}]}],
        }
        (self.folder / "prometheus.yml").write_text(json.dumps(config, indent=1))  # JSON is YAML
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = (self.folder / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [found, f"--config.file={self.folder / 'prometheus.yml'}", f"--storage.tsdb.path={self.folder / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + start_timeout_s
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise PrometheusError(f"prometheus did not start:\n{self.log()}")
            time.sleep(0.05)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                return bool(response.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def log(self) -> str:
        """What Prometheus has logged (warnings and errors)."""
        return (self.folder / "prometheus.log").read_text() if (self.folder / "prometheus.log").exists() else ""

    def api(self, path: str, **params: Any) -> Any:
        """``GET /api/v1/<path>``: its ``data``.

        Raises:
            PrometheusError: the API answered an error (a bad query, say).
        """
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as e:
            body = json.loads(e.read() or b"{}")
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query's result (a vector's series), now or at unix time ``at``."""
        params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
        data = self.api("query", **params)
        return data["result"] if data["resultType"] in ("vector", "matrix") else [data]

    def query_range(self, expr: str, start: float, end: float, step_s: float) -> list[dict[str, Any]]:
        """A range query's series: each ``{"metric": labels, "values": [[t, "v"], ...]}``."""
        return list(self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=step_s)["result"])

    def wait_for_targets(self, timeout_s: float = 30) -> None:
        """Wait until every target has been scraped successfully."""
        deadline = time.monotonic() + timeout_s
        while True:
            active = self.api("targets")["activeTargets"]
            if active and all(t["health"] == "up" for t in active):
                return
            if time.monotonic() > deadline:
                raise PrometheusError(f"targets not up after {timeout_s} s: {active}")
            time.sleep(0.2)

    def close(self) -> None:
        """Stop Prometheus and remove its files."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> PrometheusProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def dashboard_queries(dashboard: Path, variables: Mapping[str, str]) -> list[tuple[str, str, str]]:
    """Every query of a Grafana dashboard's panels as (panel title, legend, query) with variables filled in.

    ``variables`` gives each template variable's value (``$job``, ``${job}``, ``$__rate_interval``…).
    """
    def fill(expr: str) -> str:
        def value(m: re.Match[str]) -> str:
            name = m.group(1) or m.group(2)
            if name not in variables:
                raise KeyError(f"dashboard variable ${name} has no value")
            return variables[name]

        return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)

    out = []
    for panel in json.loads(Path(dashboard).read_text())["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target.get("legendFormat", ""), fill(target["expr"])))
    return out

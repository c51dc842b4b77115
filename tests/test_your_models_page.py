"""docs/YOUR_MODELS.md, run as written: a user's Keras code, exported, served, compared.

Every block marked ``<!-- page-test: ... -->`` on the page is acted on in order, in a fresh folder:
``write FILE`` writes the block to FILE, ``run`` runs its lines in a shell whose ``python`` and
``fusionserve`` are this environment's, ``serve REPO`` starts the server over REPO (on a free port,
not the page's 8001: later files and commands get the real address instead of ``localhost:8001``).
The comparison the page prints must show the server within the export's 1e-4 of the user's Keras.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.serving import RunningServer

pytestmark = [pytest.mark.tf, pytest.mark.slow]
PAGE = Path(__file__).resolve().parent.parent / "docs" / "YOUR_MODELS.md"
STEP = re.compile(r"<!-- page-test: (\w+)(?: (\S+))? -->\n```\w*\n(.*?)```", re.S)
PAGE_TARGET = "localhost:8001"


def test_the_page_runs_and_the_server_answers_as_the_users_keras_does(tmp_path: Path) -> None:
    steps = STEP.findall(PAGE.read_text(encoding="utf-8"))
    assert [s[0] for s in steps] == ["write", "run", "run", "serve", "write", "run"], steps
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "CUDA_VISIBLE_DEVICES": ""}  # fmt: skip
    server, outputs = None, []
    try:
        for action, argument, block in steps:
            if server is not None:
                block = block.replace(PAGE_TARGET, server.target)
            if action == "write":
                (tmp_path / argument).write_text(block, encoding="utf-8")
            elif action == "serve":
                assert "fusionserve serve --repository " + argument in block
                server = RunningServer(tmp_path / argument, metrics_port=-1)
            else:
                command = block.replace("\\\n", " ")
                done = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True,
                                      timeout=900)  # fmt: skip
                assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
                outputs.append(done.stdout)
    finally:
        if server is not None:
            server.stop()
    diff = float(re.search(r"max abs diff (\S+)", outputs[-1]).group(1))
    assert diff <= 1e-4, outputs[-1]
    assert re.search(r"multimodal\s+1\s+\(pipeline\)", outputs[1]), outputs[1]

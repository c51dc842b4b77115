"""The light client, checked as a user installs it: ``pip install .`` (no extra) into a fresh venv.

Run with the main venv's Python (it starts the server); the client venv is the argument:

    python3 -m venv .venv-client && .venv-client/bin/pip install . && .venv/bin/python .ci/client_only.py .venv-client

Checks that the client venv holds grpcio, protobuf and numpy only (and what they need), calls a
running server with the CLI and the library, and that ``fusionserve serve`` there ends with one
clear line naming the server extra.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fusionserve.data import encoded_pairs  # noqa: E402
from fusionserve.server.process import ServerProcess  # noqa: E402
from tests.tiny_repository import build  # noqa: E402

ALLOWED = {"fusionserve", "grpcio", "protobuf", "numpy", "typing-extensions", "typing_extensions", "pip", "setuptools"}


def run(venv: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    """Run one of the client venv's programs; exit the check when it fails (unless ``ok`` is False)."""
    done = subprocess.run([str(venv / "bin" / args[0]), *args[1:]], capture_output=True, text=True, timeout=120)
    if ok and done.returncode != 0:
        sys.exit(f"client_only: FAIL: {' '.join(args)} exited {done.returncode}:\n{done.stdout}{done.stderr}")
    return done


def main() -> None:
    """The checks, against the client venv given as the argument."""
    venv = Path(sys.argv[1]).resolve()
    installed = {line.split("==")[0].lower() for line in run(venv, "pip", "list", "--format=freeze").stdout.split()}
    extra = sorted(installed - ALLOWED)
    if extra:
        sys.exit(f"client_only: FAIL: the client install brought {extra}")
    print(f"client_only: the client venv holds {sorted(installed)}")
    with tempfile.TemporaryDirectory() as tmp:
        repo = build(Path(tmp) / "repo")
        image = Path(tmp) / "red_circle.png"
        png, caption = encoded_pairs(1, seed=3)[0]
        image.write_bytes(png)
        with ServerProcess(repo) as server:
            target = server.target
            assert "SERVING" in run(venv, "fusionserve", "health", "--target", target).stdout
            print(run(venv, "fusionserve", "classify", "--target", target, "--image", str(image), "--text", caption)
                  .stdout.strip())  # fmt: skip
            assert "multimodal" in run(venv, "fusionserve", "models", "--target", target).stdout
            code = ("import sys; from fusionserve.client import FusionClient\n"
                    "with FusionClient(sys.argv[1]) as c:\n"
                    "    r = c.classify_batch([(open(sys.argv[2], 'rb').read(), 'a red circle')] * 3)\n"
                    "    assert len(r) == 3 and all(x.label in ('match', 'mismatch') for x in r), r\n"
                    "    print('library: classify_batch of 3 ->', [x.label for x in r])")  # fmt: skip
            print(run(venv, "python", "-c", code, target, str(image)).stdout.strip())
            done = run(venv, "fusionserve", "loadtest", "--target", target, "--inputs", tmp, "--duration", "1",
                       "--concurrency", "2")  # fmt: skip
            assert "Requests/s" in done.stdout, done.stdout
        served = run(venv, "fusionserve", "serve", "--repository", str(repo), ok=False)
        lines = served.stderr.strip().splitlines()
        expected = "needs the server extra: pip install 'fusionserve[server]'"
        if served.returncode != 2 or len(lines) != 1 or expected not in lines[0]:
            sys.exit(f"client_only: FAIL: serve without the server extra: exit {served.returncode}, {served.stderr!r}")
    print("client_only: passed (CLI and library call a running server; serve names the missing extra)")


if __name__ == "__main__":
    main()

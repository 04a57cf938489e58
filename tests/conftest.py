"""Shared pytest setup."""

import os

import torch

# --- Triton kernels on CPU (kernel tests) -------------------------------------------------------
# triton.jit picks the interpreter when a kernel is decorated, i.e. when kernels/*.py is first
# imported, which may happen while collecting any test module; so the switch is set here, before
# collection. Without a GPU the interpreter is the only way Triton kernels can run at all.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# --- The app, started once per test session (tests/test_app.py, tests/test_browser.py) ----------
# Loading the default model takes ~20 s on two cores, so one server serves every app test. It runs
# as `python app.py`, the way users start it, with a short context so the over-long-message case
# stays cheap. Its output goes to a log file the tests can read (and show when startup fails).
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
APP_MAX_SEQ_LEN = 1024
APP_START_TIMEOUT_S = 300
APP_ENV_FLAGS = (
    "MODEL_ID",
    "ADAPTER_ID",
    "QUANTIZE",
    "DEVICE",
    "MAX_SEQ_LEN",
    "NO_TRITON",
    "GRADIO_SERVER_NAME",
    "GRADIO_SERVER_PORT",
    "PORT",
    "GRADIO_SHARE",
    "GRADIO_AUTH",
    "QUEUE_SIZE",
)


@dataclass
class AppServer:
    url: str
    log_path: Path
    process: subprocess.Popen

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_serving(server: AppServer, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"app.py exited with {server.process.returncode}:\n{server.log()[-3000:]}")
        try:
            with urllib.request.urlopen(server.url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"app.py did not serve within {timeout_s} s:\n{server.log()[-3000:]}")


@pytest.fixture(scope="session")
def app_server(tmp_path_factory) -> Iterator[AppServer]:
    """app.py on the default model, on a free local port, for the whole test session."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("app") / "app.log"
    env = {k: v for k, v in os.environ.items() if k not in APP_ENV_FLAGS}
    env["PYTHONUNBUFFERED"] = "1"
    command = [
        sys.executable,
        "app.py",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-seq-len",
        str(APP_MAX_SEQ_LEN),
    ]
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = AppServer(f"http://127.0.0.1:{port}/", log_path, process)
    try:
        _wait_until_serving(server, APP_START_TIMEOUT_S)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

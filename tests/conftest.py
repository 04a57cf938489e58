"""Shared pytest setup."""

import os

import torch

# --- Triton kernels on CPU (kernel tests) -------------------------------------------------------
# triton.jit picks the interpreter when a kernel is decorated, i.e. when kernels/*.py is first
# imported, which may happen while collecting any test module; so the switch is set here, before
# collection. Without a GPU the interpreter is the only way Triton kernels can run at all.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Every test run tunes anew: no GEMV picks from an earlier run's file (kernels/nf4_tune.py).
os.environ["NF4_TUNE_CACHE"] = ""


# --- The app, started once per test session (test_app, test_robustness, test_browser) -----------
# Loading the default model takes ~20 s on two cores, so one server serves every app test. It runs
# as `python app.py`, the way users start it, with a short context so the over-long-message case
# stays cheap. Its output goes to a log file the tests can read (and show when startup fails).
# tests/test_soak.py starts its own (running_app), so that its memory figures are its own.
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
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

    def rss_bytes(self) -> int:
        """The server's resident memory now (VmRSS of /proc/<pid>/status)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS line in /proc/<pid>/status")


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


@contextmanager
def running_app(log_dir: Path, *flags: str) -> Iterator[AppServer]:
    """`python app.py` on the default model with `flags`, on a free local port, until the block
    ends; none of the app's environment variables leak in from the caller's shell."""
    port = free_port()
    log_path = log_dir / "app.log"
    env = {k: v for k, v in os.environ.items() if k not in APP_ENV_FLAGS}
    env["PYTHONUNBUFFERED"] = "1"
    command = [sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port), *flags]
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


@pytest.fixture(scope="session")
def app_server(tmp_path_factory) -> Iterator[AppServer]:
    """app.py on the default model for the whole test session (test_app, test_robustness,
    test_browser), with a short context so the over-long-message cases stay cheap."""
    with running_app(tmp_path_factory.mktemp("app"), "--max-seq-len", str(APP_MAX_SEQ_LEN)) as server:
        yield server


class StandIn:
    """An engine for tests of the app's queue, login and page: one slot, generations that hold
    it until `release` is set (or their CancelToken is), and `started` counting those that ran.
    Deterministic where the real engine's timing is not, and no model to load."""

    max_batch = 1

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = 0

    def info(self) -> dict:
        return {"model": "stand-in", "device": "cpu", "max_seq_len": 64, "max_batch": 1}

    def adapters(self) -> list[str]:
        return []

    def chat(self, messages, settings, *, system_prompt=None, adapter=None, cancel=None):
        self.started += 1
        return self._events(cancel)

    def _events(self, cancel) -> Iterator:
        from model.engine import GenerationEvent, GenerationStats

        yield GenerationEvent("", GenerationStats(prompt_tokens=1), False)
        while not self.release.wait(0.01):
            if cancel is not None and cancel.cancelled:
                yield GenerationEvent("", GenerationStats(1, 0, stop_reason="cancelled"), True)
                return
        yield GenerationEvent("done", GenerationStats(1, 1, stop_reason="length"), True)


@pytest.fixture
def stand_in_app(request) -> Iterator[tuple[str, StandIn]]:
    """app.serve in this process over a StandIn, with the command-line flags a test passes
    through indirect parametrization; (url, engine)."""
    import app

    flags = getattr(request, "param", [])
    engine = StandIn()
    args = app.parse_args(["--host", "127.0.0.1", "--port", str(free_port()), *flags])
    demo = app.serve(engine, args, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{args.port}/", engine
    finally:
        engine.release.set()
        demo.close()

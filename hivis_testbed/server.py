"""Start and stop ``vllm serve`` as a child process (for the demo, the e2e tests and benchmarks).

    with VLLMServer(model_dir, ["--speculative-config", json.dumps(spec)]) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none")

Binds 127.0.0.1 on a free port, waits for /health, and on exit stops the whole process group
(the API server and its engine process). The server log goes to a file shown on failure.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CPU_DEFAULTS = ["--dtype", "float32", "--max-model-len", "512", "--enforce-eager", "--gpu-memory-utilization", "0.25",
                "--limit-mm-per-prompt", '{"image": 2}']


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_executable() -> str:
    """The ``vllm`` command beside this interpreter (the CPU launcher in .venv), else on PATH."""
    here = Path(sys.executable).parent / "vllm"
    found = str(here) if here.exists() else shutil.which("vllm")
    if not found:
        raise FileNotFoundError("no `vllm` command found; run `make setup` (or install vllm) first")
    return found


class VLLMServer:
    def __init__(self, model: str, args: list[str] | None = None, env: dict[str, str] | None = None,
                 startup_timeout: float = 300.0, defaults: list[str] | None = None):
        self.model, self.args = model, list(args or [])
        self.defaults = CPU_DEFAULTS if defaults is None else defaults
        self.env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
                    **(env or {})}
        self.timeout = startup_timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log_path = Path(tempfile.mkstemp(prefix="vllm-serve-", suffix=".log")[1])

    def __enter__(self) -> VLLMServer:
        cmd = [vllm_executable(), "serve", self.model, "--host", "127.0.0.1", "--port", str(self.port),
               *self.defaults, *self.args]
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with code {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(1.0)
        self.__exit__(None, None, None)
        raise TimeoutError(f"vllm serve not healthy after {self.timeout:.0f}s:\n{self.tail()}")

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def metrics(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            return r.read().decode()

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=30)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=10)
        if getattr(self, "_log", None):
            self._log.close()

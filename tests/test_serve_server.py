"""A real ``hierarchy serve`` process on a free loopback port, on the demo pipeline: ready, classify,
and SIGTERM finishing the request in flight before a clean exit."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

READY_TIMEOUT_S = 180


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> Path:
    """The demo's pipeline (trained for 2 steps on generated images) and its held-back images."""
    from hierarchy.commands._demo import SMALL, run_demo

    out = tmp_path_factory.getbasetemp() / "serve-demo"  # one per session, though two modules import this
    if not (out / "pipeline.yaml").is_file():
        run_demo(out, SMALL, device="cpu")
    return out


def held_back(demo: Path) -> list[Path]:
    return sorted((demo / "data" / "held_back").glob("*.jpg"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(pipeline: Path, log: Path, *args: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """``hierarchy serve`` in a subprocess, yielded once ``/ready`` answers 200; stopped with SIGTERM."""
    port = free_port()
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "hierarchy", "serve", str(pipeline), "--port", str(port),
                                 "--device", "cpu", *args], stdout=err, stderr=subprocess.STDOUT,
                                env={**os.environ, "TQDM_DISABLE": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc, log)
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_ready(base: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"hierarchy serve exited {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    pytest.fail(f"hierarchy serve not ready after {READY_TIMEOUT_S}s:\n{log.read_text(errors='replace')[-3000:]}")


def files_of(paths: list[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]


def test_real_server_classifies_then_sigterm_finishes_in_flight(demo: Path, tmp_path: Path) -> None:
    images = held_back(demo)
    log = tmp_path / "serve.log"
    with running_server(demo / "pipeline.yaml", log) as (base, proc):
        records = httpx.post(f"{base}/v1/classify", files=files_of(images[:2]), timeout=60).json()
        assert [r["path"] for r in records] == [p.name for p in images[:2]]
        assert all(r["status"] in ("ok", "abstained") and r["trace"][0]["stage"] == "gate" for r in records)

        big = files_of((images * 6)[:16])
        result: dict = {}
        thread = threading.Thread(target=lambda: result.update(
            r=httpx.post(f"{base}/v1/classify?explain=true", files=big, timeout=120)))
        thread.start()
        seen = False
        while thread.is_alive() and not seen:
            metrics = httpx.get(f"{base}/metrics", timeout=10).text
            seen = "hierarchy_classify_in_flight 1.0" in metrics
        proc.send_signal(signal.SIGTERM)
        thread.join(120)
        # uvicorn re-raises the SIGTERM it handled once it is done, so the exit status says "terminated"
        assert proc.wait(60) in (0, -signal.SIGTERM), log.read_text()
    assert seen, "the request finished before SIGTERM could be sent"
    response = result["r"]
    assert response.status_code == 200 and len(response.json()) == 16
    assert all(r["explanations"][0]["available"] for r in response.json())
    text = log.read_text()
    assert "Shutting down" in text and "Traceback" not in text
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{base}/health", timeout=2)

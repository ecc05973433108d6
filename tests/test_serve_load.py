"""Load on a real ``hierarchy serve`` (loopback only, bounded in count and time): concurrent clients
sending 4 images per request; no 5xx but deliberate 503s (retried), every record accounted for.
``run_load`` is also what benchmarks/bench_serve.py measures with."""
from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from test_serve_server import demo, held_back, running_server  # noqa: F401 - the fixture

httpx = pytest.importorskip("httpx")


@dataclass
class LoadResult:
    latencies: list[float] = field(default_factory=list)  # seconds per answered request
    records: int = 0
    busy: int = 0  # deliberate 503s, retried
    failures: list[str] = field(default_factory=list)  # anything else: 5xx, wrong record count, timeouts
    wall_s: float = 0.0

    def percentile(self, q: float) -> float:
        return statistics.quantiles(self.latencies, n=100)[int(q) - 1] if len(self.latencies) > 1 else 0.0

    def summary(self) -> str:
        return (f"{len(self.latencies)} requests, {self.records} records in {self.wall_s:.1f}s: "
                f"{self.records / self.wall_s:.1f} images/s, p50 {self.percentile(50) * 1000:.0f} ms, "
                f"p95 {self.percentile(95) * 1000:.0f} ms, {self.busy} busy 503s")


def run_load(base: str, images: list[Path], clients: int, requests: int, per_request: int = 4,
             time_limit_s: float = 300.0) -> LoadResult:
    """``clients`` threads, each sending ``requests`` POSTs of ``per_request`` images (cycling through
    ``images``); a 503 is waited out (Retry-After, at most 0.1 s here) and sent again."""
    payloads = [(p.name, p.read_bytes()) for p in images]
    result, lock = LoadResult(), threading.Lock()
    deadline = time.monotonic() + time_limit_s

    def client(k: int) -> None:
        with httpx.Client(base_url=base, timeout=60) as http:
            for r in range(requests):
                chosen = [payloads[(k * requests + r + i) % len(payloads)] for i in range(per_request)]
                while time.monotonic() < deadline:
                    start = time.perf_counter()
                    try:
                        resp = http.post("/v1/classify", files=[("files", (n, d, "image/jpeg")) for n, d in chosen])
                    except httpx.HTTPError as exc:
                        with lock:
                            result.failures.append(f"client {k}: {type(exc).__name__}: {exc}")
                        return
                    elapsed = time.perf_counter() - start
                    with lock:
                        if resp.status_code == 503:
                            result.busy += 1
                        elif resp.status_code != 200:
                            result.failures.append(f"client {k}: HTTP {resp.status_code}: {resp.text[:200]}")
                        elif [rec["path"] for rec in resp.json()] != [n for n, _ in chosen]:
                            result.failures.append(f"client {k}: records do not match the files sent")
                        else:
                            result.latencies.append(elapsed)
                            result.records += per_request
                    if resp.status_code != 503:
                        break
                    time.sleep(min(0.1, float(resp.headers.get("retry-after", 1))))
                else:
                    with lock:
                        result.failures.append(f"client {k}: time limit of {time_limit_s:.0f}s reached")
                    return

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.wall_s = time.perf_counter() - start
    return result


def check(result: LoadResult, clients: int, requests: int, per_request: int = 4) -> None:
    assert not result.failures, result.failures[:5]
    assert len(result.latencies) == clients * requests and result.records == clients * requests * per_request


def test_small_load(demo: Path, tmp_path: Path) -> None:
    with running_server(demo / "pipeline.yaml", tmp_path / "serve.log", "--max-queue", "2") as (base, _):
        result = run_load(base, held_back(demo), clients=4, requests=5, time_limit_s=120)
        metrics = httpx.get(f"{base}/metrics").text
    print(result.summary())
    check(result, 4, 5)
    assert f"hierarchy_busy_rejections_total {float(result.busy)}" in metrics  # every 503 was a deliberate one


@pytest.mark.slow
def test_load_8_clients_x_50_requests_of_4_images(demo: Path, tmp_path: Path) -> None:
    with running_server(demo / "pipeline.yaml", tmp_path / "serve.log") as (base, _):
        result = run_load(base, held_back(demo), clients=8, requests=50, time_limit_s=600)
    print(result.summary())
    check(result, 8, 50)

"""`hierarchy serve` under load vs `hierarchy run` on the same images.

    python benchmarks/bench_serve.py                  # 8 clients x 50 requests x 4 images (a few minutes)
    python benchmarks/bench_serve.py --clients 4 --requests 10 --demo DIR

The pipeline is the demo's (ResNet18 trained for 2 steps on generated images, 64 px). The images
are generated 600x450 JPEGs. Serve: a real `hierarchy serve` process on a free loopback port,
timed once ready; every client sends its requests back to back, and a 503 (queue full) is waited
out and sent again. Latency is per request (4 images), throughput is images answered per second
of wall time. Run: `hierarchy run` on exactly the images the clients sent, as a subprocess (with its
start-up) and through the library with the pipeline already loaded (steady state, like the server).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, hierarchy_cmd, make_jpegs, print_header

sys.path.insert(0, str(REPO / "tests"))


def make_demo(out: Path) -> Path:
    from hierarchy.commands._demo import DemoSize, run_demo

    if not (out / "pipeline.yaml").exists():
        run_demo(out, DemoSize(lesions=16, coco_images=10, holdout=3, img_size=64, epochs=1, batch_size=16,
                               max_steps=2), device="cpu")
    return out / "pipeline.yaml"


def sent_images(images: list[Path], clients: int, requests: int, per_request: int) -> list[Path]:
    """Exactly what run_load sends, in order per client."""
    return [images[(k * requests + r + i) % len(images)]
            for k in range(clients) for r in range(requests) for i in range(per_request)]


def bench_run(pipeline: Path, paths: list[Path], work: Path) -> tuple[float, float]:
    """(images/s of `hierarchy run` as a subprocess, images/s through Router.run once loaded)."""
    from hierarchy.engine.pipeline import load_pipeline
    from hierarchy.engine.router import Router

    listing = [str(p) for p in paths]
    start = time.perf_counter()
    subprocess.run([*hierarchy_cmd(), "-q", "run", str(pipeline), *listing, "--format", "jsonl", "-o",
                    str(work / "run.jsonl"), "--device", "cpu"], check=True, env={**os.environ, "TQDM_DISABLE": "1"})
    cli = len(paths) / (time.perf_counter() - start)
    router = Router.from_pipeline(load_pipeline(pipeline), device="cpu")
    list(router.run(paths[:32]))  # warm
    start = time.perf_counter()
    n = sum(1 for _ in router.run(paths))
    return cli, n / (time.perf_counter() - start)


def main() -> None:
    from test_serve_load import run_load
    from test_serve_server import running_server

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--per-request", type=int, default=4)
    ap.add_argument("--images", type=int, default=200, help="distinct generated JPEGs, cycled")
    ap.add_argument("--demo", type=Path, help="demo directory to create or reuse (default: a temporary one)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pipeline = make_demo(args.demo or work / "demo")
        images = make_jpegs(work / "images", args.images)
        print_header()
        with running_server(pipeline, work / "serve.log") as (base, _):
            result = run_load(base, images, args.clients, args.requests, args.per_request, time_limit_s=1800)
        if result.failures:
            raise SystemExit(f"load test failed: {result.failures[:5]}")
        paths = sent_images(images, args.clients, args.requests, args.per_request)
        cli, steady = bench_run(pipeline, paths, work)
    print(f"serve: {args.clients} clients x {args.requests} requests x {args.per_request} images: {result.summary()}")
    print(f"run:   the same {len(paths)} images: `hierarchy run` {cli:.1f} images/s (with start-up), "
          f"Router.run {steady:.1f} images/s (loaded)")


if __name__ == "__main__":
    main()

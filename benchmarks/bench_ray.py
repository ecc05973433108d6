"""`hierarchy run --ray` (a local Ray cluster) vs plain `hierarchy run`, on the same generated JPEGs.

    python benchmarks/bench_ray.py                # 256 images at 224 px, untrained ResNet18
    python benchmarks/bench_ray.py --n 2000 --batch-size 32

Both are the CLI in a fresh subprocess, timed end to end (start-up included: Ray's is the cluster
start and the actors' model loads). Prints the machine, both throughputs and the ratio. On few cores
Ray costs more than it gives (its raylet, object store and read tasks share the cores with the
model); it pays off with many cores, GPUs or several machines (docs/scaling.md).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from _common import hierarchy_cmd, make_jpegs, print_header, timed_subprocess, write_checkpoint, write_pipeline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--images", type=Path, help="reuse/generate the JPEGs here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = make_jpegs(args.images or tmp / "imgs", args.n)
        pipe = write_pipeline(tmp, write_checkpoint(tmp / "run"))
        base = [*hierarchy_cmd(), "-q", "run", str(pipe), str(images[0].parent), "--format", "jsonl",
                "--batch-size", str(args.batch_size), "--engine", "torch"]
        plain_s = timed_subprocess([*base, "-o", str(tmp / "plain.jsonl")])
        ray_s = timed_subprocess([*base, "-o", str(tmp / "ray.jsonl"), "--ray"])
        labels = [[json.loads(x)["label"] for x in (tmp / f).read_text().splitlines()] for f in ("plain.jsonl", "ray.jsonl")]
    print_header()
    print(f"{args.n} images, batch {args.batch_size}, untrained ResNet18 at 224 px, torch engine")
    print(f"plain run: {plain_s:6.1f} s  {args.n / plain_s:6.1f} img/s")
    print(f"--ray:     {ray_s:6.1f} s  {args.n / ray_s:6.1f} img/s")
    print(f"ratio ray/plain throughput: {plain_s / ray_s:.2f}x; same labels: {labels[0] == labels[1]}")


if __name__ == "__main__":
    main()

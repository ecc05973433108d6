"""Peak RSS of `hierarchy run` over 1,000 vs 10,000 small JPEGs: memory must not grow with inputs.

    python benchmarks/bench_memory.py                 # 64 px model so it takes a few minutes
    python benchmarks/bench_memory.py --size 224 --n 1000 10000 50000

Each run is a fresh process; peak RSS is the child's ru_maxrss (os.wait4). Output goes to a jsonl
file (streamed; `--format table` must buffer to size its columns, the others stream).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

from _common import hierarchy_cmd, load, make_jpegs, print_header, table, write_checkpoint, write_pipeline


def peak_rss(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of one child process."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "TQDM_DISABLE": "1"})
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd} exited {proc.returncode}")
    return usage.ru_maxrss / 1024, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--size", type=int, default=64, help="model input size")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "hierarchy-bench")
    args = ap.parse_args()
    folder = args.workdir / "small"
    make_jpegs(folder, max(args.n), size=(96, 72))
    pipe = write_pipeline(args.workdir / f"mem{args.size}", write_checkpoint(args.workdir / f"mem{args.size}" / "ckpt",
                                                                        size=args.size))
    print_header()
    rows = []
    for n in args.n:
        listing = args.workdir / f"list{n}"
        listing.mkdir(exist_ok=True)
        for i in range(n):  # a folder of n symlinks: one directory input, like a real run
            link = listing / f"img_{i:06d}.jpg"
            if not link.exists():
                link.symlink_to(folder / f"img_{i:06d}.jpg")
        rss, secs = peak_rss([*hierarchy_cmd(), "-q", "run", str(pipe), str(listing), "--format", "jsonl",
                              "-o", str(args.workdir / "mem.jsonl")])
        rows.append([f"{n:,}", f"{rss:.0f}", f"{secs:.1f}", f"{n / secs:.0f}"])
        print(rows[-1], flush=True)
    print(table(["images", "peak RSS (MiB)", "seconds", "img/s"], rows))
    print(load())


if __name__ == "__main__":
    main()

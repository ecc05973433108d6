"""Cold start: `hierarchy run` on one image vs a bare `python -c "import torch, torchvision"`.

    python benchmarks/bench_startup.py [--repeats 5]

Each command is a fresh process (page cache warm after the first round); rounds are interleaved
and medians compared. Also shows `hierarchy run --engine onnx` and `--engine openvino` (the
checkpoint is exported first with `hierarchy export`; each skipped when its runtime is not
installed), `hierarchy --help` and
`hierarchy validate` (no torch import).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

from _common import (export_for_onnx, hierarchy_cmd, interleave, load, make_jpegs, median, table, timed_subprocess,
                     write_checkpoint, write_pipeline)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "hierarchy-bench")
    args = ap.parse_args()
    img = make_jpegs(args.workdir / "run600", 1)[0]
    run = write_checkpoint(args.workdir / "ckpt224")
    pipe = write_pipeline(args.workdir, run)
    h = hierarchy_cmd()
    cmds = {
        "python -c 'import torch, torchvision'": [sys.executable, "-c", "import torch, torchvision"],
        "python -c 'import torch'": [sys.executable, "-c", "import torch"],
        "hierarchy run PIPELINE one.jpg": [*h, "-q", "run", str(pipe), str(img), "--format", "jsonl"],
        ONNX_ROW: [*h, "-q", "run", str(pipe), str(img), "--format", "jsonl", "--engine", "onnx"],
        OPENVINO_ROW: [*h, "-q", "run", str(pipe), str(img), "--format", "jsonl", "--engine", "openvino"],
        "hierarchy --help": [*h, "--help"],
        "hierarchy validate PIPELINE": [*h, "validate", str(pipe)],
    }
    if not export_for_onnx(run):
        del cmds[ONNX_ROW], cmds[OPENVINO_ROW]
    elif importlib.util.find_spec("openvino") is None:
        del cmds[OPENVINO_ROW]
    print(load(), flush=True)
    timed_subprocess(cmds["hierarchy run PIPELINE one.jpg"])  # warm the page cache
    res = interleave({k: (lambda c=c: timed_subprocess(c)) for k, c in cmds.items()}, args.repeats)
    bare = median(res["python -c 'import torch, torchvision'"])
    rows = [[k, f"{median(v):.2f}", f"{median(v) / bare:.2f}x"] for k, v in res.items()]
    print(table(["command", "seconds (median)", "vs import torch, torchvision"], rows))
    print("all rounds:", {k: [round(x, 2) for x in v] for k, v in res.items()})
    for row in (ONNX_ROW, OPENVINO_ROW):
        if row in res:
            print(f"{row}: one-image cold start {median(res[row]):.2f} s (target <= 0.5 s for an exported engine)")
    print(load())


ONNX_ROW = "hierarchy run --engine onnx PIPELINE one.jpg"
OPENVINO_ROW = "hierarchy run --engine openvino PIPELINE one.jpg"


if __name__ == "__main__":
    main()

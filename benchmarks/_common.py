"""Shared helpers for the benchmarks: generated JPEGs, a checkpoint, a pipeline, timing, tables."""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_jpegs(folder: Path, n: int, size: tuple[int, int] = (600, 450), seed: int = 0) -> list[Path]:
    """``n`` generated 600x450 JPEGs (skin lesions and scenes, with sensor noise), reused if present."""
    import numpy as np
    from PIL import Image

    from hierarchy.data.synth import _lesion_shape, _rng, _scene, skin_image

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        path = folder / f"img_{i:06d}.jpg"
        if not path.exists():
            rng = _rng(seed * 1_000_003 + i)
            arr = skin_image(rng, _lesion_shape(rng, "mel"), size) if i % 2 else _scene(rng, *size)
            arr = np.clip(arr + rng.normal(0, 6, arr.shape), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(path, "JPEG", quality=90)
        out.append(path)
    return out


def write_checkpoint(run: Path, size: int = 224, seed: int = 0) -> Path:
    """An untrained ResNet18 (2 classes) as a hierarchy run dir for stage skin_vs_nonskin."""
    import torch

    from hierarchy.models.checkpoint import save_weights
    from hierarchy.models.metadata import CheckpointMetadata, write_metadata
    from hierarchy.models.backbones import create_model
    from hierarchy.data.preset import Preset

    torch.manual_seed(seed)
    model = create_model("resnet18", 2)[0].eval()
    save_weights(run / "best.safetensors", model)
    arch = {"backbone": "resnet18", "library": "torchvision", "num_classes": 2}
    write_metadata(run / "metadata.json", CheckpointMetadata(
        stage="skin_vs_nonskin", labels=["skin", "non-skin"], arch=arch, preset=Preset(size=size).to_dict(),
        created_by="benchmarks"))
    return run


def write_pipeline(folder: Path, run: Path) -> Path:
    path = folder / "pipeline.yaml"
    path.write_text(f"name: bench\nroot: gate\nstages:\n  gate:\n    stage: skin_vs_nonskin\n"
                    f"    weights: {run}\n    ood: 'off'\n    routes: {{default: stop}}\n")
    return path


def hierarchy_cmd() -> list[str]:
    return [sys.executable, "-m", "hierarchy"]


def timed_subprocess(cmd: Sequence[str], env: dict | None = None) -> float:
    t = time.perf_counter()
    subprocess.run(list(cmd), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "TQDM_DISABLE": "1", **(env or {})})
    return time.perf_counter() - t


def interleave(fns: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Run every function once per round, round after round; each returns a measurement."""
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            out[k].append(fn())
    return out


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def load() -> str:
    return "load average %.2f %.2f %.2f" % os.getloadavg()


def print_header() -> None:
    """The machine this ran on (CPU, the flags that matter, cores, library versions) and its load: the
    first lines of every benchmark, so a table is never read as if it held for another machine."""
    from hierarchy.core.machine import header

    print(header(), flush=True)
    print(load(), flush=True)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in r] for r in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells[1:])])


def export_for_onnx(run: Path) -> bool:
    """`hierarchy export` the checkpoint (what the --engine onnx/openvino rows load); False without onnx."""
    import importlib.util

    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
        print("onnxruntime/onnx not installed (pip install 'hierarchy-cascade[onnx]'): no exported-engine rows", flush=True)
        return False
    from hierarchy.engine.export import export_run

    done = export_run(run)
    print(f"exported {done['onnx']} (max |logit diff| vs torch {done['max_abs_logit_diff']:.2g})", flush=True)
    return True

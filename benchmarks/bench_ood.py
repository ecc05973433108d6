"""What does the OOD score cost `hierarchy run`? Same process, interleaved, repeated.

Two checkpoints share one set of ResNet18 weights; one has OOD statistics (the default kNN bank of
2,000 x 512 fp16 plus the Mahalanobis matrices), the other has none. Both are loaded as
``hierarchy run`` loads them, and timed alternately:

* ``predict``: ``predictor.predict`` on one uint8 batch (the model part only: the worst case for
  the relative cost, since decoding is left out);
* ``run``: ``Router.run`` over JPEG files (decode + resize + predict + routing), what the CLI does.

    python benchmarks/bench_ood.py [--size 224] [--batch 32] [--images 96] [--rounds 7] [--method knn]

Prints a JSON summary; ``overhead`` = 1 - throughput(on) / throughput(off) per round (median, min,
max; ``best`` compares the fastest rounds), by wall clock and by CPU time of this process, and
``score_alone`` times the scorer on its own against one forward pass.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable


def make_checkpoints(root: Path, size: int, method: str) -> tuple[Path, Path]:
    """Two run dirs with the same random-init skin-gate weights: with and without OOD statistics."""
    import numpy as np
    import torch

    from hierarchy.ood import fit as ood
    from hierarchy.ood import scores
    from hierarchy.models.checkpoint import save_weights
    from hierarchy.core.fsutil import atomic_write_json
    from hierarchy.models.backbones import create_model
    from hierarchy.data.preset import Preset

    torch.manual_seed(0)
    model, arch = create_model("resnet18", 2)
    meta = {"format": "hierarchy.checkpoint", "schema_version": 1, "stage": "skin_vs_nonskin",
            "labels": ["skin", "non-skin"], "arch": arch, "preset": Preset(size=size).to_dict(),
            "temperature": 1.0, "ood": None, "created_by": "bench_ood"}
    off, on = root / "off", root / "on"
    for run in (off, on):
        save_weights(run / "best.safetensors", model)
    rng = np.random.default_rng(0)
    feats = np.abs(rng.normal(0, 1, (4000, 512))).astype(np.float32)
    scorer, fit = ood.fit_scorer(feats, np.arange(4000) % 2, method=method)
    digest = scores.save_scorer(scorer, on)
    entry = {"method": method, "threshold": 1e9, "file": scores.OOD_FILE, "sha256": digest, "fit": fit}
    atomic_write_json(off / "metadata.json", meta)
    atomic_write_json(on / "metadata.json", {**meta, "ood": entry})
    return off, on


def make_images(folder: Path, n: int) -> list[Path]:
    from hierarchy.data.synth import make_coco

    make_coco(folder, sets=("val2017",), n_images=n, size=(320, 240), seed=1)
    return sorted((folder / "val2017").glob("*.jpg"))


def router_for(run: Path) -> Any:
    from hierarchy.engine.pipeline import parse_pipeline
    from hierarchy.engine.router import Router

    text = (f"name: bench\nroot: gate\nstages:\n  gate:\n    stage: skin_vs_nonskin\n    weights: {run}\n"
            "    ood: auto\n    routes: {default: stop}\n")
    return Router.from_pipeline(parse_pipeline(text), device="cpu")


def interleaved(fns: dict[str, Callable[[], int]], rounds: int) -> dict[str, dict[str, list[float]]]:
    """Items per wall second and per CPU second (all threads of this process) of each function,
    alternating the order every round. CPU seconds are steadier on a machine shared with others."""
    out: dict[str, dict[str, list[float]]] = {clock: {k: [] for k in fns} for clock in ("wall", "cpu")}
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            wall, cpu = time.perf_counter(), time.process_time()
            n = fns[name]()
            out["wall"][name].append(n / (time.perf_counter() - wall))
            out["cpu"][name].append(n / (time.process_time() - cpu))
    return out


def summary(rates: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for clock, r in rates.items():
        ratios = [on / off for on, off in zip(r["on"], r["off"])]
        out[clock] = {"off_per_s": statistics.median(r["off"]), "on_per_s": statistics.median(r["on"]),
                      "overhead_median": 1 - statistics.median(ratios), "overhead_min": 1 - max(ratios),
                      "overhead_max": 1 - min(ratios), "overhead_best": 1 - max(r["on"]) / max(r["off"]),
                      "rounds": len(ratios)}
    return out


def scorer_share(predictor: Any, batch: Any, rounds: int) -> dict[str, float]:
    """Seconds per batch of the forward pass and of the OOD score alone (best of ``rounds``)."""
    pred = predictor.predict(batch, return_logits=True, return_features=True)
    feats, logits = pred.features, pred.logits
    fwd, score = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        predictor.predict(batch)
        fwd.append(time.perf_counter() - start)
        start = time.perf_counter()
        for _ in range(10):
            predictor.ood_scorer.score(feats, logits)
        score.append((time.perf_counter() - start) / 10)
    return {"predict_s": min(fwd), "score_s": min(score), "share": min(score) / min(fwd)}


def main() -> None:
    import torch

    from hierarchy.data.imageio import load_image

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--method", default="knn", choices=("knn", "mahalanobis", "energy"))
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-ood-"))
    try:
        off, on = make_checkpoints(root, args.size, args.method)
        images = make_images(root / "img", args.images)
        routers = {"off": router_for(off), "on": router_for(on)}
        preds = {k: r.stages["gate"].predictor for k, r in routers.items()}
        batch = torch.stack([preds["off"].preset.to_uint8(load_image(p)) for p in images[:args.batch]])
        for pr in preds.values():  # warm-up
            pr.predict(batch)
        predict = interleaved({k: (lambda pr=pr: (pr.predict(batch), len(batch))[1]) for k, pr in preds.items()},
                              args.rounds * 4)  # short calls: more pairs, each pair sees the same machine load
        run = interleaved({k: (lambda r=r: sum(1 for _ in r.run(images, args.batch))) for k, r in routers.items()},
                          args.rounds)
        result = {"method": args.method, "size": args.size, "batch": args.batch, "images": len(images),
                  "device": str(preds["on"].device), "precision": preds["on"].precision,
                  "torch_threads": torch.get_num_threads(), "predict": summary(predict), "run": summary(run),
                  "score_alone": scorer_share(preds["on"], batch, args.rounds)}
        from hierarchy.core.machine import header

        print(header())
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

"""`hierarchy demo`: the whole skin_vs_nonskin workflow end to end on GENERATED data.

It writes a HAM10000-style metadata CSV with image parts and a COCO instances JSON with images
(the real formats, synthetic pixels), builds the dataset with the real builder, trains ResNet18
from scratch at a small size, writes a pipeline YAML and runs it on held-back generated images.
"""
from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PIPELINE = """\
# Written by `hierarchy demo`. The weights were trained on GENERATED images: for illustration only.
name: demo-skin-gate
root: gate
stages:
  gate:
    stage: skin_vs_nonskin
    weights: {weights}
    threshold: 0.7        # top-1 probability below this -> abstained
    routes: {{skin: stop, non-skin: stop}}
"""


@dataclass(frozen=True)
class DemoSize:
    lesions: int = 90
    coco_images: int = 60
    holdout: int = 6
    img_size: int = 64
    epochs: int = 3
    batch_size: int = 32
    max_steps: int | None = None


FULL = DemoSize()
SMALL = DemoSize(lesions=16, coco_images=10, holdout=3, img_size=32, epochs=1, batch_size=16, max_steps=2)


def say(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr)


def generate(data: Path, size: DemoSize) -> tuple[Path, Path, Path]:
    from hierarchy.core.fsutil import atomic_write_with
    from hierarchy.data.synth import make_coco, make_ham10000

    ham = make_ham10000(data / "HAM10000", n_lesions=size.lesions, seed=0)
    coco = make_coco(data / "coco", n_images=size.coco_images, seed=0)
    held = data / "held_back"
    make_ham10000(held / "_ham", n_lesions=size.holdout, max_images_per_lesion=1, seed=101)
    make_coco(held / "_coco", sets=("val2017",), n_images=size.holdout, seed=101)
    for i, src in enumerate(sorted((held / "_ham").rglob("*.jpg")) + sorted((held / "_coco").rglob("*.jpg"))):
        kind = "skin" if "_ham" in src.parts else "scene"
        atomic_write_with(held / f"{i:02d}_{kind}.jpg", lambda tmp, src=src: shutil.copyfile(src, tmp))
    shutil.rmtree(held / "_ham")
    shutil.rmtree(held / "_coco")
    return ham, coco, held


def run_demo(out: Path, size: DemoSize = FULL, device: str = "auto") -> int:
    from hierarchy.registry import get_stage

    from hierarchy.commands.cli import main as cli_main
    from hierarchy.config.load import load_stage_config
    from hierarchy.core.fsutil import atomic_write_text
    from hierarchy.data.builder import build_dataset
    from hierarchy.train.trainer import train_stage

    start = time.perf_counter()
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)  # the demo directory is the demo's own; rerunning starts clean
    say(f"NOTE: all images are GENERATED (synthetic skin blobs vs synthetic scenes), not real data. Output: {out}")
    ham, coco, held = generate(out / "data", size)
    cls = get_stage("skin_vs_nonskin")
    config = load_stage_config(cls, train={
        "pretrained": "none", "img_size": size.img_size, "epochs": size.epochs, "batch_size": size.batch_size,
        "max_steps_per_epoch": size.max_steps, "device": device, "out": str(out / "runs"), "name": "demo"})
    stage = cls(config)
    say("building the dataset (HAM10000 split by lesion_id, COCO by image)")
    build_dataset(config.dataset, out / "dataset", labels=stage.labels, stage=stage.name,
                  roots={"ham10000": ham, "coco": coco})
    say(f"training ResNet18 from scratch at {size.img_size}px for {size.epochs} epoch(s)")
    run_dir = train_stage(stage, out / "dataset")
    pipeline = out / "pipeline.yaml"
    atomic_write_text(pipeline, PIPELINE.format(weights=run_dir.resolve() / "best.safetensors"))
    say(f"running `hierarchy run {pipeline} {held}` on {len(list(held.glob('*.jpg')))} held-back generated images")
    code = cli_main(["run", str(pipeline), str(held), "--device", device])
    say("status 'abstained' = confidence under the stage's threshold; 'rejected' = the image looks unlike the "
        "training images (out-of-distribution score over its threshold, docs/ood.md). Both are answers, not errors.")
    say(f"done in {time.perf_counter() - start:.0f}s. Next: `hierarchy run {pipeline} YOUR_IMAGES`, or train on real "
        "data with `hierarchy build-dataset skin_vs_nonskin --ham10000 DIR --coco DIR`.")
    return code

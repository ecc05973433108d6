import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from hierarchy.metrics import classification as m
from hierarchy.metrics import plots


def _check_png(path, min_size=(300, 200)):
    assert path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size[0] >= min_size[0] and im.size[1] >= min_size[1]
        pixels = np.asarray(im.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10  # not a flat colour
    assert not list(path.parent.glob(".*.tmp"))  # atomic write left no temp file


def _calibration_data(seed=0, n=2000):
    rng = np.random.default_rng(seed)
    conf = rng.uniform(0.3, 1.0, n)
    correct = rng.uniform(size=n) < conf ** 2  # over-confident
    return conf, correct


def test_plot_confusion(tmp_path):
    cm = m.confusion_matrix([0, 0, 1, 1, 2, 2, 2], [0, 1, 1, 1, 2, 0, 2], 4)
    labels = ["benign", "malignant", "other", "empty"]
    out = plots.plot_confusion(cm, labels, tmp_path / "cm.png", "test")
    _check_png(out)


def test_plot_confusion_shape_mismatch(tmp_path):
    with pytest.raises(ValueError, match="does not match"):
        plots.plot_confusion(np.zeros((2, 2)), ["a", "b", "c"], tmp_path / "x.png", "t")


def test_plot_reliability_before_after(tmp_path):
    conf, correct = _calibration_data()
    bins = m.reliability_bins(conf, correct)
    after = m.reliability_bins(conf ** 1.5, correct)
    out = plots.plot_reliability(bins, tmp_path / "rel.png", "calibration", ece=0.1,
                                 bins_after=after, ece_after=0.02)
    _check_png(out)


def test_plot_reliability_single_and_empty_bins(tmp_path):
    bins = m.reliability_bins([0.95, 0.97], [1, 0])
    _check_png(plots.plot_reliability(bins, tmp_path / "rel.png", "sparse"))


def test_plot_risk_coverage(tmp_path):
    conf, correct = _calibration_data()
    curves = {"gate": m.risk_coverage(conf, correct),
              "end-to-end": m.risk_coverage(conf ** 2, correct),
              "empty": m.risk_coverage([], [])}
    _check_png(plots.plot_risk_coverage(curves, tmp_path / "rc.png", "risk-coverage"))


def test_plot_training_curves_skips_missing_values(tmp_path):
    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": None if e == 2 else 1.2 / e,
                "train_acc": 1 - 0.5 / e, "val_acc": 1 - 0.6 / e} for e in range(1, 6)]
    _check_png(plots.plot_training_curves(history, tmp_path / "train.png"), min_size=(600, 200))


def test_plot_score_histogram(tmp_path):
    rng = np.random.default_rng(0)
    s_in, s_out = rng.normal(0, 1, 1000), rng.normal(2.5, 1, 300)
    t = m.threshold_for_tpr_in(s_in, keep=0.95)
    out = plots.plot_score_histogram(s_in, s_out, tmp_path / "h.png", threshold=t, title="ood")
    _check_png(out)


def test_plot_overwrites_existing_file(tmp_path):
    path = tmp_path / "sub" / "h.png"
    plots.plot_score_histogram([0.1, 0.2], [0.8], path)
    plots.plot_score_histogram([0.1, 0.2], [0.9], path, threshold=0.5)
    _check_png(path)


def test_plots_leave_no_pyplot_state(tmp_path):
    code = (
        "import sys; from hierarchy.metrics import plots\n"
        "assert 'matplotlib' not in sys.modules  # nothing imported at module level\n"
        f"plots.plot_score_histogram([0.1, 0.2], [0.9], {str(tmp_path / 'h.png')!r})\n"
        "print('matplotlib.pyplot' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_plots_handle_degenerate_inputs(tmp_path):
    plots.plot_risk_coverage({"perfect": m.risk_coverage([0.9, 0.8], [1, 1])}, tmp_path / "a.png")
    plots.plot_training_curves([], tmp_path / "b.png")
    plots.plot_score_histogram([], [], tmp_path / "c.png")
    plots.plot_reliability(m.reliability_bins([], []), tmp_path / "d.png")
    assert all((tmp_path / f"{n}.png").stat().st_size > 0 for n in "abcd")

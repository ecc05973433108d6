"""The plots show the numbers they are given: assertions on the figures' data (bar heights, line
x/y values, cell colours, labels), plus the PNG writing (atomic, headless, no pyplot)."""
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from hierarchy.metrics import classification as m
from hierarchy.metrics import plots
from hierarchy.metrics import thresholds as th


def _check_png(path, min_size=(300, 200)):
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size[0] >= min_size[0] and im.size[1] >= min_size[1]
    assert not list(path.parent.glob(".*.tmp"))  # atomic write left no temp file


def _calibration_data(seed=0, n=2000):
    rng = np.random.default_rng(seed)
    conf = rng.uniform(0.3, 1.0, n)
    correct = rng.uniform(size=n) < conf ** 2  # over-confident
    return conf, correct


def _legend(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


def _bars(ax):
    return [(p.get_x(), p.get_width(), p.get_height()) for p in ax.patches]


# ---------------------------------------------------------------- confusion matrix


def test_confusion_cells_show_counts_and_row_shares():
    cm = m.confusion_matrix([0, 0, 1, 1, 2, 2, 2], [0, 1, 1, 1, 2, 0, 2], 4)
    labels = ["benign", "malignant", "other", "empty"]
    ax = plots.confusion_figure(cm, labels, "test").axes[0]
    colour = np.asarray(ax.images[0].get_array())
    np.testing.assert_allclose(colour[0], [0.5, 0.5, 0, 0])
    np.testing.assert_allclose(colour[2], [1 / 3, 0, 2 / 3, 0])
    np.testing.assert_array_equal(colour[3], [0, 0, 0, 0])  # no support: zeros, not NaN
    texts = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    assert texts[(2, 2)] == "2\n66.7%" and texts[(1, 1)] == "2\n100.0%" and texts[(3, 3)] == "0\n0.0%"
    assert [t.get_text() for t in ax.get_xticklabels()] == labels
    assert [t.get_text() for t in ax.get_yticklabels()] == ["benign (n=2)", "malignant (n=2)", "other (n=3)",
                                                            "empty (n=0)"]
    assert ax.get_title() == "test" and ax.get_xlabel() == "predicted" and ax.get_ylabel() == "true"


def test_confusion_colours_raw_counts_when_not_normalized():
    cm = [[5, 1], [0, 2]]
    ax = plots.confusion_figure(cm, ["a", "b"], normalize=False).axes[0]
    np.testing.assert_array_equal(np.asarray(ax.images[0].get_array()), cm)
    assert ax.images[0].get_clim() == (0, 5)


def test_plot_confusion_writes_a_png(tmp_path):
    _check_png(plots.plot_confusion([[1, 0], [1, 1]], ["a", "b"], tmp_path / "cm.png"))


def test_plot_confusion_shape_mismatch(tmp_path):
    with pytest.raises(ValueError, match="does not match"):
        plots.plot_confusion(np.zeros((2, 2)), ["a", "b", "c"], tmp_path / "x.png", "t")
    assert not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------- reliability


def test_reliability_bars_are_bin_accuracies_and_counts():
    bins = m.reliability_bins([0.05, 0.15, 0.55, 0.6, 0.95], [1, 0, 1, 0, 1], n_bins=4)
    top, bottom = plots.reliability_figure(bins, "cal", ece=0.1).axes
    # bins (0, .25]: 2 items, 1 right; (.5, .75]: 2 items, 1 right; (.75, 1]: 1 item, right; (.25, .5] empty
    np.testing.assert_allclose(_bars(top), [(0, 0.25, 0.5), (0.25, 0.25, 0), (0.5, 0.25, 0.5), (0.75, 0.25, 1)])
    np.testing.assert_allclose([h for *_, h in _bars(bottom)], [2, 0, 2, 1])
    diagonal = top.get_lines()[0]
    assert list(diagonal.get_xdata()) == [0, 1] and list(diagonal.get_ydata()) == [0, 1]
    assert _legend(top) == ["perfect calibration", "model (ECE 0.100)"]
    assert top.get_title() == "cal"


def test_reliability_before_after_side_by_side():
    conf, correct = _calibration_data()
    before, after = m.reliability_bins(conf, correct, n_bins=5), m.reliability_bins(conf ** 1.5, correct, n_bins=5)
    top, bottom = plots.reliability_figure(before, ece=0.1, bins_after=after, ece_after=0.02).axes
    bars = _bars(top)
    assert len(bars) == 10 and all(w == pytest.approx(0.1) for _, w, _ in bars)
    np.testing.assert_allclose([x for x, *_ in bars[5:]], [b["lo"] + 0.1 for b in after])  # shifted half a bin
    np.testing.assert_allclose([h for *_, h in bars[:5]], [b["accuracy"] or 0.0 for b in before])
    np.testing.assert_allclose([h for *_, h in _bars(bottom)[5:]], [b["count"] for b in after])
    assert _legend(top) == ["perfect calibration", "before (ECE 0.100)", "after (ECE 0.020)"]


# ---------------------------------------------------------------- risk-coverage


def test_risk_coverage_steps_through_the_curve_points():
    gate = m.risk_coverage([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 1])
    curves = {"gate": gate, "empty": m.risk_coverage([], [])}
    ax = plots.risk_coverage_figure(curves, "rc").axes[0]
    (line,) = ax.get_lines()  # the empty curve draws nothing
    np.testing.assert_allclose(line.get_xdata(), [0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(line.get_ydata(), [0, 0, 0.5, 1 / 3, 0.25])
    assert line.get_drawstyle() == "steps-pre"
    assert _legend(ax) == [f"gate (AURC {gate['aurc']:.3f})"]
    assert ax.get_xlabel().startswith("coverage") and ax.get_title() == "rc"


# ---------------------------------------------------------------- training curves


def test_training_curves_plot_each_split_and_skip_missing_values():
    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": None if e == 2 else 1.2 / e,
                "train_acc": 1 - 0.5 / e, "val_acc": 1 - 0.6 / e} for e in range(1, 6)]
    loss, acc = plots.training_curves_figure(history).axes
    train, val = loss.get_lines()
    assert list(train.get_xdata()) == [1, 2, 3, 4, 5] and list(val.get_xdata()) == [1, 3, 4, 5]
    np.testing.assert_allclose(val.get_ydata(), [1.2, 0.4, 0.3, 0.24])
    np.testing.assert_allclose(acc.get_lines()[1].get_ydata(), [1 - 0.6 / e for e in range(1, 6)])
    assert (loss.get_title(), acc.get_title()) == ("loss", "accuracy")
    assert _legend(loss) == ["train", "val"]


def test_training_curves_without_history_have_no_lines_or_legend():
    for ax in plots.training_curves_figure([]).axes:
        assert len(ax.get_lines()) == 0 and ax.get_legend() is None


# ---------------------------------------------------------------- OOD score histogram


def test_score_histogram_shows_both_densities_and_the_threshold():
    rng = np.random.default_rng(0)
    s_in, s_out = rng.normal(0, 1, 1000), rng.normal(2.5, 1, 300)
    t = th.threshold_for_tpr_in(s_in, keep=0.95)
    ax = plots.score_histogram_figure(s_in, s_out, threshold=t, title="ood").axes[0]
    sides = list(ax.containers)
    assert len(sides) == 2
    for bars in sides:  # density: each histogram integrates to 1
        assert sum(p.get_height() * p.get_width() for p in bars) == pytest.approx(1.0)
    in_mean = sum(p.get_x() * p.get_height() * p.get_width() for p in sides[0])
    out_mean = sum(p.get_x() * p.get_height() * p.get_width() for p in sides[1])
    assert out_mean - in_mean == pytest.approx(2.5, abs=0.3)
    (vline,) = ax.get_lines()
    assert list(vline.get_xdata()) == [t, t]
    assert _legend(ax) == ["in-distribution (n=1000)", "OOD (n=300)", f"threshold {t:.3g}"]


def test_score_histogram_of_nothing_is_empty_axes():
    ax = plots.score_histogram_figure([], []).axes[0]
    assert len(ax.patches) == 0 and len(ax.get_lines()) == 0 and ax.get_legend() is None


# ---------------------------------------------------------------- writing


@pytest.mark.parametrize("name", ["confusion", "reliability", "risk_coverage", "training", "histogram"])
def test_every_plot_writes_a_png(tmp_path, name):
    path = tmp_path / f"{name}.png"
    write = {
        "confusion": lambda: plots.plot_confusion([[2, 1], [0, 3]], ["a", "b"], path),
        "reliability": lambda: plots.plot_reliability(m.reliability_bins([0.9, 0.4], [1, 0]), path),
        "risk_coverage": lambda: plots.plot_risk_coverage({"g": m.risk_coverage([0.9, 0.4], [1, 0])}, path),
        "training": lambda: plots.plot_training_curves([{"epoch": 1, "train_loss": 1.0}], path),
        "histogram": lambda: plots.plot_score_histogram([0.1, 0.2], [0.9], path, threshold=0.5),
    }[name]
    assert write() == path
    _check_png(path)


def test_plot_overwrites_existing_file(tmp_path):
    path = tmp_path / "sub" / "h.png"
    plots.plot_score_histogram([0.1, 0.2], [0.8], path, title="first")
    first = path.read_bytes()
    plots.plot_score_histogram([0.1, 0.2], [0.9], path, threshold=0.5)
    assert path.read_bytes() != first
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

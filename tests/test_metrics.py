import math
import subprocess
import sys

import numpy as np
import pytest

from hierarchy.metrics import classification as m
from hierarchy.metrics import thresholds as th
from plain_json import assert_plain_json


# ----------------------------------------------------------------- classification

Y_TRUE = [0, 0, 1, 1, 2, 2]
Y_PRED = [0, 1, 1, 1, 0, 2]
LABELS = ["a", "b", "c", "d"]  # "d" has no support and is never predicted


def test_confusion_matrix_rows_are_truth():
    cm = m.confusion_matrix(Y_TRUE, Y_PRED, 4)
    assert cm.dtype.kind == "i"
    assert cm.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]


def test_normalize_rows_zero_support_row_is_zeros():
    norm = m.normalize_rows(m.confusion_matrix(Y_TRUE, Y_PRED, 4))
    assert np.allclose(norm, [[.5, .5, 0, 0], [0, 1, 0, 0], [.5, 0, .5, 0], [0, 0, 0, 0]])
    assert not np.isnan(norm).any()


def test_confusion_matrix_rejects_bad_input():
    with pytest.raises(ValueError, match="outside"):
        m.confusion_matrix([0, 3], [0, 1], 3)
    with pytest.raises(ValueError, match="length mismatch"):
        m.confusion_matrix([0, 1], [0], 2)
    with pytest.raises(ValueError, match="integer"):
        m.confusion_matrix([0.5], [0], 2)


def test_classification_report_hand_computed():
    r = m.classification_report(Y_TRUE, Y_PRED, LABELS)
    # tp = [1, 2, 1, 0], support = [2, 2, 2, 0], predicted = [2, 3, 1, 0]
    # precision = [1/2, 2/3, 1/1, 0 (0/0)], recall = [1/2, 2/2, 1/2, 0 (0/0)]
    # f1 = [.5, 2*(2/3)*1/(5/3) = .8, 2*1*.5/1.5 = 2/3, 0]
    assert r["accuracy"] == pytest.approx(4 / 6)
    assert r["per_class"]["b"] == pytest.approx(
        {"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert r["per_class"]["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    # macro over 4 labels: P = (.5 + 2/3 + 1 + 0)/4 = 13/24, R = 2/4,
    #                      F1 = (.5 + .8 + 2/3 + 0)/4 = 59/120
    assert r["macro"] == pytest.approx({"precision": 13 / 24, "recall": 0.5, "f1": 59 / 120})
    # weighted by support (1/3 each for a, b, c): P = 13/18, R = 2/3, F1 = 59/90
    assert r["weighted"] == pytest.approx({"precision": 13 / 18, "recall": 2 / 3, "f1": 59 / 90})
    assert r["confusion"]["labels"] == LABELS
    assert r["confusion"]["counts"][3] == [0, 0, 0, 0]
    assert_plain_json(r)


def test_classification_report_empty_input_is_zeros():
    r = m.classification_report([], [], ["a", "b"])
    assert r["accuracy"] == 0.0 and r["macro"]["f1"] == 0.0 and r["weighted"]["precision"] == 0.0


def test_classification_report_matches_sklearn():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    t, p = rng.integers(0, 5, 300), rng.integers(0, 4, 300)  # class 4 never predicted
    r = m.classification_report(t, p, list("abcde"))
    for avg in ("macro", "weighted"):
        prf = sk.precision_recall_fscore_support(
            t, p, labels=range(5), average=avg, zero_division=0)
        assert [r[avg][k] for k in ("precision", "recall", "f1")] == pytest.approx(prf[:3])
    assert r["accuracy"] == pytest.approx(sk.accuracy_score(t, p))


# ----------------------------------------------------------------- AUC


def test_roc_auc_hand_computed():
    # positives .35 (beats .1, loses to .4) and .8 (beats both): 3 of 4 pairs
    assert m.roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)


def test_roc_auc_ties_count_half():
    # pos .5 vs neg .5 tie (.5) and vs .2 (1); pos .9 beats both (2): 3.5 / 4
    assert m.roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]) == pytest.approx(0.875)
    assert m.roc_auc([0, 1, 0, 1], [0.3, 0.3, 0.3, 0.3]) == pytest.approx(0.5)


def test_roc_auc_single_class_is_none():
    assert m.roc_auc([1, 1, 1], [0.1, 0.2, 0.3]) is None
    assert m.roc_auc([], []) is None


def test_roc_auc_matches_sklearn_with_ties():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    y, s = rng.integers(0, 2, 500), rng.integers(0, 20, 500) / 20.0  # heavy ties
    assert m.roc_auc(y, s) == pytest.approx(sk.roc_auc_score(y, s))


# ----------------------------------------------------------------- calibration


def test_ece_hand_computed():
    # 2 bins: (0, .5] holds .2, .4 -> conf .3, acc .5, gap .2
    #         (.5, 1] holds .6, .9, 1 -> conf 2.5/3, acc 2/3, gap 1/6
    # ECE = (.2*2 + 1/6*3) / 5 = .18
    ece = m.expected_calibration_error([0.2, 0.4, 0.6, 0.9, 1.0], [0, 1, 1, 1, 0], n_bins=2)
    assert ece == pytest.approx(0.18)


def test_reliability_bins_edges_and_empty_bins():
    bins = m.reliability_bins([0.0, 0.5, 0.75], [True, False, True], n_bins=4)
    # 0.0 -> first bin; 0.5 -> (.25, .5]; 0.75 -> (.5, .75]; (.75, 1] empty
    assert [b["count"] for b in bins] == [1, 1, 1, 0]
    assert bins[1] == {"lo": 0.25, "hi": 0.5, "count": 1, "confidence": 0.5, "accuracy": 0.0}
    assert bins[3]["confidence"] is None and bins[3]["accuracy"] is None


def test_ece_perfect_and_empty():
    assert m.expected_calibration_error([1.0, 1.0], [1, 1]) == 0.0
    assert m.expected_calibration_error([], []) == 0.0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        m.expected_calibration_error([1.2], [1])


# ----------------------------------------------------------------- selective prediction


def test_risk_coverage_ties_are_not_split():
    rc = m.risk_coverage([0.9, 0.8, 0.8, 0.6, 0.5], [1, 0, 1, 1, 0])
    # cuts after .9 (k=1, 0 errors), .8 (k=3, 1), .6 (k=4, 1), .5 (k=5, 2)
    assert rc["thresholds"] == [0.9, 0.8, 0.6, 0.5]
    assert rc["coverage"] == pytest.approx([0.2, 0.6, 0.8, 1.0])
    assert rc["risk"] == pytest.approx([0.0, 1 / 3, 0.25, 0.4])
    # AURC = 0*.2 + 1/3*.4 + .25*.2 + .4*.2
    assert rc["aurc"] == pytest.approx(0.4 / 3 + 0.05 + 0.08)


def test_risk_coverage_aurc_without_ties_is_mean_topk_risk():
    rc = m.risk_coverage([0.5, 0.9, 0.7], [1, 0, 1])
    # top-k risks: k=1 -> 1, k=2 -> 1/2, k=3 -> 1/3
    assert rc["aurc"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)


def test_risk_coverage_empty():
    assert m.risk_coverage([], []) == {"coverage": [], "risk": [], "thresholds": [], "aurc": 0.0}


def test_selective_summary():
    s = m.selective_summary([0.9, 0.8, 0.3, 0.2], [1, 0, 1, 0], [1, 1, 0, 0])
    assert s == pytest.approx({"n": 4, "n_accepted": 2, "coverage": 0.5, "abstention_rate": 0.5,
                               "accuracy_accepted": 0.5, "mean_confidence_accepted": 0.85})
    none = m.selective_summary([0.1], [1], [False])
    assert none["accuracy_accepted"] is None and none["abstention_rate"] == 1.0


# ----------------------------------------------------------------- hierarchical


def test_hierarchical_prf_hand_computed():
    true = [["skin", "malignant", "melanoma"], ["skin", "benign", "nevus"], ["non_skin"]]
    pred = [["skin", "malignant", "bcc"], ["skin"], ["skin", "benign"]]
    # |T∩P| = 2 + 1 + 0 = 3; sum|P| = 3 + 1 + 2 = 6; sum|T| = 3 + 3 + 1 = 7
    r = m.hierarchical_prf(true, pred)
    assert r["precision"] == pytest.approx(0.5)
    assert r["recall"] == pytest.approx(3 / 7)
    assert r["f1"] == pytest.approx(2 * 0.5 * (3 / 7) / (0.5 + 3 / 7))  # = 6/13


def test_hierarchical_prf_same_name_under_different_parents_does_not_match():
    assert m.hierarchical_prf([["a", "other"]], [["b", "other"]])["precision"] == 0.0


def test_hierarchical_prf_rejects_string_paths():
    with pytest.raises(ValueError, match="list of label strings"):
        m.hierarchical_prf(["skin"], [["skin"]])


def test_error_attribution():
    true = [["skin", "malignant", "melanoma"], ["skin", "benign", "nevus"], ["non_skin"],
            ["skin", "benign", "nevus"], ["skin", "malignant"], ["skin", "benign", "nevus"]]
    pred = [["skin", "malignant", "bcc"], ["skin"], ["skin", "benign"],
            ["skin", "benign", "nevus"], ["skin", "malignant", "melanoma"],
            ["skin", "malignant", "melanoma"]]
    stages = [["gate", "bm", "mal"], ["gate", "bm"], ["gate", "bm"],
              ["gate", "bm", "ben"], ["gate", "bm", "mal"], ["gate", "bm", "mal"]]
    r = m.error_attribution(true, pred, stages)
    assert r["items"] == [
        {"index": 0, "stage_id": "mal", "depth": 2, "kind": "wrong"},
        {"index": 1, "stage_id": "bm", "depth": 1, "kind": "abstained"},
        {"index": 2, "stage_id": "gate", "depth": 0, "kind": "wrong"},
        {"index": 5, "stage_id": "bm", "depth": 1, "kind": "wrong"},
    ]
    assert r["counts"] == {"mal": 1, "bm": 2, "gate": 1}
    assert r["by_kind"]["bm"] == {"wrong": 1, "abstained": 1}
    assert (r["n_items"], r["n_errors"], r["n_deeper_than_truth"]) == (6, 4, 1)


def test_error_attribution_missing_stage_id():
    with pytest.raises(ValueError, match="item 0: no stage id for depth 1"):
        m.error_attribution([["skin", "benign"]], [["skin"]], [["gate"]])


# ----------------------------------------------------------------- temperature scaling


def test_softmax_and_nll_hand_computed():
    assert m.softmax([[0.0, math.log(3)]]) == pytest.approx(np.array([[0.25, 0.75]]))
    assert m.softmax([[0.0, 2 * math.log(3)]], T=2.0) == pytest.approx(np.array([[0.25, 0.75]]))
    assert m.nll([[0.0, 0.0]], [0]) == pytest.approx(math.log(2))
    assert m.nll([[0.0, math.log(3)]], [1]) == pytest.approx(-math.log(0.75))
    assert m.softmax([[1000.0, 0.0]])[0, 0] == 1.0  # no overflow
    with pytest.raises(ValueError, match="temperature"):
        m.nll([[0.0, 0.0]], [0], T=0.0)


def _overconfident(n: int, c: int, scale: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, c)) * 1.5
    p = m.softmax(base)
    y = np.array([rng.choice(c, p=row) for row in p])  # labels drawn from the calibrated model
    return base * scale, y


@pytest.mark.parametrize("scale", [4.0, 0.4])
def test_fit_temperature_recovers_scale(scale):
    logits, y = _overconfident(3000, 5, scale, seed=2)
    T = m.fit_temperature(logits, y)
    assert T == pytest.approx(scale, rel=0.25)
    assert m.nll(logits, y, T) <= m.nll(logits, y, 1.0)
    assert (m.softmax(logits, T).argmax(1) == logits.argmax(1)).all()


def test_fit_temperature_is_the_minimum_of_a_fine_grid():
    logits, y = _overconfident(500, 4, 3.0, seed=3)
    T = m.fit_temperature(logits, y)
    grid_best = min(m.nll(logits, y, t) for t in np.exp(np.linspace(-3, 3, 601)))
    assert m.nll(logits, y, T) <= grid_best + 1e-9


def test_fit_temperature_never_worse_than_one():
    # one sample per class, perfectly separated: NLL keeps falling as T -> 0 but T=1 stays valid
    logits, y = np.array([[3.0, 0.0], [0.0, 3.0]]), np.array([0, 1])
    T = m.fit_temperature(logits, y)
    assert m.nll(logits, y, T) <= m.nll(logits, y, 1.0)
    assert m.fit_temperature(np.zeros((0, 3)), []) == 1.0
    # constant logits: NLL does not depend on T at all -> 1.0
    assert m.fit_temperature(np.zeros((4, 3)), [0, 1, 2, 0]) == 1.0


# ----------------------------------------------------------------- threshold tuning

TT_LABELS = ["skin", "non_skin"]
# (top-1 conf, predicted, true):
#   .99 skin skin | .95 skin skin | .90 skin non_skin | .85 skin skin
#   .80 non_skin non_skin | .70 skin non_skin
TT_CONF = [0.99, 0.95, 0.90, 0.85, 0.80, 0.70]
TT_PRED = [0, 0, 0, 0, 1, 0]
TT_Y = [0, 0, 1, 0, 1, 1]


def _tt_probs() -> np.ndarray:
    probs = np.empty((6, 2))
    for i, (c, p) in enumerate(zip(TT_CONF, TT_PRED)):
        probs[i, p], probs[i, 1 - p] = c, 1 - c
    return probs


# cuts (strict -> loose): skin precision 1, 1, 2/3, 3/4, 3/4, 3/5; risk 0, 0, 1/3, 1/4, 1/5, 2/6
@pytest.mark.parametrize("target,threshold,key,value", [
    ({"target_precision": 0.75, "label": "skin"}, 0.80, "precision", 0.75),
    ({"target_precision": 1.0, "label": "skin"}, 0.95, "precision", 1.0),
    ({"target_precision": 1.0, "label": "non_skin"}, 0.70, "precision", 1.0),
    ({"max_risk": 0.25}, 0.80, "risk", 0.2),
    ({"max_risk": 0.1}, 0.95, "risk", 0.0),
    ({"target_coverage": 0.5}, 0.90, "coverage", 0.5),  # highest t still accepting 3 of 6
])
def test_tune_threshold_known_answers(target, threshold, key, value):
    r = th.tune_threshold(_tt_probs(), TT_Y, target, TT_LABELS)
    assert r["met"] is True and "reason" not in r
    assert r["threshold"] == pytest.approx(threshold)
    assert r["achieved"][key] == pytest.approx(value)
    assert r["n"] == 6 and r["target"] == target


def test_tune_threshold_unmet_returns_strictest():
    r = th.tune_threshold([[0.9, 0.1], [0.6, 0.4]], [1, 0], {"max_risk": 0.1}, ["a", "b"])
    assert r["met"] is False and r["threshold"] == pytest.approx(0.9)
    assert "best achievable risk is 0.5000" in r["reason"]


def test_tune_threshold_does_not_split_ties():
    # two items at .8: one right, one wrong -> risk 0 is unreachable
    r = th.tune_threshold([[0.8, 0.2], [0.8, 0.2]], [0, 1], {"max_risk": 0.0}, ["a", "b"])
    assert r["met"] is False and r["achieved"]["n_accepted"] == 2


@pytest.mark.parametrize("target,match", [
    ({"target_precision": 0.9}, "needs 'label'"),
    ({"target_precision": 0.9, "label": "cat"}, "needs 'label'"),
    ({"target_coverage": 0.9, "label": "skin"}, "only applies"),
    ({"precision": 0.9}, "exactly one of"),
    ({"max_risk": 0.1, "target_coverage": 0.9}, "exactly one of"),
    ({"target_coverage": 1.5}, r"\(0, 1\]"),
    ({"max_risk": -0.1}, r"\[0, 1\]"),
    ([("max_risk", 0.1)], "must be a dict"),
])
def test_tune_threshold_validates_target(target, match):
    with pytest.raises(ValueError, match=match):
        th.tune_threshold(_tt_probs(), TT_Y, target, TT_LABELS)


# ----------------------------------------------------------------- OOD


def test_ood_auroc_hand_computed():
    # out .35 beats .1 .2 .3 (3 of 4); .5 .6 .7 beat all 4: 15/16
    assert th.ood_auroc([0.1, 0.2, 0.3, 0.4], [0.35, 0.5, 0.6, 0.7]) == pytest.approx(15 / 16)
    assert th.ood_auroc([0.1], []) is None


def test_fpr_at_tpr_hand_computed():
    s_in, s_out = [0.1, 0.2, 0.3, 0.4], [0.35, 0.5, 0.6, 0.7]
    assert th.fpr_at_tpr(s_in, s_out, tpr=0.75) == 0.0  # t = .5 (3rd highest OOD)
    assert th.fpr_at_tpr(s_in, s_out, tpr=1.0) == 0.25  # t = .35 -> only .4 flagged
    # 0.55 * 100 = 55.00000000000001 in floats; 55th highest of 0..99 is 45 -> in >= 45: 2 of 3
    assert th.fpr_at_tpr([44.5, 45.0, 50.0], np.arange(100), tpr=0.55) == pytest.approx(2 / 3)
    assert th.fpr_at_tpr([], [1.0]) is None


def test_threshold_for_tpr_in():
    assert th.threshold_for_tpr_in([0.4, 0.1, 0.3, 0.2], keep=0.75) == 0.3  # 3rd lowest
    s = np.arange(100.0)
    t = th.threshold_for_tpr_in(s, keep=0.99)
    assert t == 98.0 and (s <= t).mean() == 0.99
    assert th.threshold_for_tpr_in(s, keep=0.55) == 54.0  # 0.55 * 100 = 55.00000000000001
    with pytest.raises(ValueError, match="keep"):
        th.threshold_for_tpr_in(s, keep=0.0)


def test_threshold_check_target_without_labels():
    assert th.check_target({"target_precision": 0.9, "label": "anything"}) == "target_precision"
    with pytest.raises(ValueError, match="needs 'label'"):
        th.check_target({"target_precision": 0.9})


def test_metrics_does_not_import_torch_or_matplotlib():
    code = ("import sys, hierarchy.metrics.classification, hierarchy.metrics.thresholds; "
            "print(sorted({'torch', 'matplotlib'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

"""OOD scores on small synthetic feature sets where the right answer is known, threshold tuning,
storage, and the predictor computing the score from its one forward pass."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hierarchy.ood import fit, scores
from hierarchy.train import ood as train_ood
from hierarchy.core.errors import CheckpointError
from hierarchy.metrics.thresholds import ood_auroc
from hierarchy.config.stage import Prediction
from hierarchy.train.trainer import train_stage
from plain_json import assert_plain_json

D = 16


def clusters(n: int = 200, seed: int = 0, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Two Gaussian clusters in D dims, at +3 and -3 on the first axis, anisotropic noise."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = rng.normal(0, 1, (n, D)) * np.linspace(0.5, 2.0, D) * scale
    x[:, 0] += np.where(y == 0, 3.0, -3.0)
    return x.astype(np.float32), y


def t(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


# ---------------------------------------------------------------- energy


def test_energy_is_monotonic_in_logit_scale() -> None:
    z = t([[3.0, 1.0, 0.5]])
    energies = [float(scores.energy_score(z * s)[0]) for s in (0.5, 1.0, 2.0, 4.0, 8.0)]
    assert all(a > b for a, b in zip(energies, energies[1:]))  # more confident -> less OOD


def test_energy_matches_formula_and_is_stable() -> None:
    z = t([[1.0, 2.0], [1000.0, 999.0]])
    expected = -np.log(np.exp(1.0) + np.exp(2.0))
    assert float(scores.energy_score(z)[0]) == pytest.approx(expected, rel=1e-6)
    assert np.isfinite(scores.energy_score(z)).all()


# ---------------------------------------------------------------- mahalanobis


def test_mahalanobis_far_point_scores_higher_than_cluster_points() -> None:
    x, y = clusters()
    means, precision, shrinkage = fit.fit_mahalanobis(x, y)
    assert means.shape == (2, D) and precision.shape == (D, D) and 0.0 <= shrinkage <= 1.0
    np.testing.assert_allclose(means[:, 0], [3.0, -3.0], atol=0.4)
    test_in, _ = clusters(50, seed=1)
    far = np.zeros((1, D), np.float32)
    far[0, 1] = 12.0  # 12 along a low-variance axis: far from both clusters
    s_in = scores.mahalanobis_score(t(test_in), t(means), t(precision))
    s_far = scores.mahalanobis_score(t(far), t(means), t(precision))
    assert s_far[0] > s_in.max()


def test_mahalanobis_uses_the_covariance_not_euclid() -> None:
    x, y = clusters(2000)
    means, precision, _ = fit.fit_mahalanobis(x, y)
    # same Euclidean offset from the class-0 mean, along the low-variance vs high-variance axis
    low, high = means[:1].copy(), means[:1].copy()
    low[0, 1] += 2.0
    high[0, D - 1] += 2.0
    s_low, s_high = (scores.mahalanobis_score(t(p), t(means), t(precision))[0] for p in (low, high))
    assert s_low > 4 * s_high


def test_mahalanobis_is_the_squared_distance_to_the_nearest_mean() -> None:
    means = np.array([[0.0, 0.0], [10.0, 0.0]], np.float32)
    precision = np.eye(2, dtype=np.float32)
    s = scores.mahalanobis_score(t([[1.0, 1.0], [9.0, 0.0]]), t(means), t(precision))
    np.testing.assert_allclose(s, [2.0, 1.0], atol=1e-5)


def test_shrinkage_keeps_few_samples_invertible() -> None:
    x, y = clusters(12)  # fewer samples than dimensions + classes: the sample covariance is singular
    x = np.c_[x, np.zeros((12, 4), np.float32)]  # and a few dead (always zero) features
    _, precision, shrinkage = fit.fit_mahalanobis(x, y)
    assert shrinkage > 0 and np.all(np.isfinite(precision))


def test_ledoit_wolf_matches_scikit_learn() -> None:
    covariance = pytest.importorskip("sklearn.covariance")
    x, _ = clusters(300)
    x = x - x.mean(axis=0)
    expected = covariance.ledoit_wolf_shrinkage(x, assume_centered=True)
    assert fit.ledoit_wolf_shrinkage(x) == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------- knn


def test_knn_distance_known_geometry() -> None:
    bank = scores.l2_normalize(t([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    x = t([[2.0, 0.0], [1.0, 1.0]])  # on bank[0]; 45 degrees from bank[0] and bank[1]
    s1 = scores.knn_score(x, bank, k=1)
    np.testing.assert_allclose(s1, [0.0, np.sqrt(2 - np.sqrt(2))], atol=1e-6)
    s2 = scores.knn_score(x, bank, k=2)
    np.testing.assert_allclose(s2, [np.sqrt(2), np.sqrt(2 - np.sqrt(2))], atol=1e-6)
    assert scores.knn_score(x, bank, k=99).shape == (2,)  # k clipped to the bank size


def test_knn_separates_a_far_cluster_and_ignores_scale() -> None:
    x, y = clusters()
    bank = fit.fit_knn_bank(x, y, size=100).astype(np.float32)
    assert bank.shape == (100, D)
    np.testing.assert_allclose(np.linalg.norm(bank, axis=1), 1.0, atol=1e-3)
    test_in, _ = clusters(50, seed=1)
    rng = np.random.default_rng(2)
    far = rng.normal(0, 1, (50, D)).astype(np.float32)
    far[:, 5] += 8.0  # a direction the training data never takes
    s_in, s_out = (scores.knn_score(t(a), bank, 5) for a in (test_in, far))
    assert ood_auroc(s_in, s_out) > 0.95
    np.testing.assert_allclose(scores.knn_score(t(test_in * 7), bank, 5), s_in, atol=1e-3)


def test_stratified_subsample_keeps_every_class() -> None:
    y = np.r_[np.zeros(990, int), np.ones(10, int)]
    idx = fit.stratified_subsample(y, 100)
    assert len(idx) <= 100 and set(y[idx]) == {0, 1} and np.all(np.diff(idx) > 0)
    assert len(fit.stratified_subsample(y[:50], 100)) == 50


# ---------------------------------------------------------------- threshold and comparison


def test_tune_keeps_the_target_share() -> None:
    rng = np.random.default_rng(0)
    s = {"knn": rng.normal(0, 1, 1000)}
    for keep in (0.9, 0.95, 0.99, 1.0):
        tuned = fit.tune(s, keep)["knn"]
        assert tuned["kept"] == pytest.approx(keep, abs=1e-9)
        assert (s["knn"] <= tuned["threshold"]).mean() >= keep
    assert fit.tune({"e": np.arange(7.0)}, 0.99)["e"]["threshold"] == 6.0  # small n: keep everything


def test_compare_reports_auroc_fpr95_and_rejected() -> None:
    s_in, s_out = {"m": np.arange(100.0)}, {"m": np.arange(50.0, 150.0)}
    row = fit.compare(s_in, s_out, {"m": 98.0})["m"]
    assert row["auroc"] == pytest.approx(ood_auroc(s_in["m"], s_out["m"]))
    assert 0.0 < row["fpr95"] < 1.0 and row["rejected"] == pytest.approx(0.51)


# ---------------------------------------------------------------- scorer, storage, predictor


def fitted(method: str = "knn") -> scores.OODScorer:
    x, y = clusters()
    scorer, facts = fit.fit_scorer(x, y, method=method, k=3, bank_size=50)
    assert facts["n"] == 200 and facts["bank"] == 50 and facts["k"] == 3 and facts["classes"] == 2
    return scorer


def test_scorer_roundtrip_through_safetensors(tmp_path: Path) -> None:
    scorer = fitted("mahalanobis")
    scorer.threshold = 1.5
    digest = scores.save_scorer(scorer, tmp_path)
    meta = {"method": "mahalanobis", "threshold": 1.5, "file": scores.OOD_FILE, "sha256": digest, "fit": {"k": 3}}
    loaded = scores.load_scorer(meta, tmp_path)
    assert loaded is not None and loaded.available() == list(scores.METHODS) and loaded.threshold == 1.5
    x, _ = clusters(20, seed=3)
    logits = np.random.default_rng(3).normal(size=(20, 2)).astype(np.float32)
    for m in scores.METHODS:
        np.testing.assert_allclose(loaded.score(x, logits, m), scorer.score(x, logits, m), atol=1e-2, rtol=1e-3)
    assert (tmp_path / scores.OOD_FILE).read_bytes()[8:9] == b"{"  # safetensors, never pickle


def test_load_scorer_refuses_missing_or_foreign_files(tmp_path: Path) -> None:
    assert scores.load_scorer(None, tmp_path) is None
    meta = {"method": "knn", "threshold": 0.5, "file": scores.OOD_FILE, "sha256": "0" * 64}
    with pytest.raises(CheckpointError, match="missing"):
        scores.load_scorer(meta, tmp_path)
    scores.save_scorer(fitted(), tmp_path)
    with pytest.raises(CheckpointError, match="SHA-256"):
        scores.load_scorer(meta, tmp_path)


def test_unknown_or_unfitted_method_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown OOD method"):
        scores.OODScorer("odin")
    with pytest.raises(ValueError, match="needs statistics"):
        scores.OODScorer("knn")
    assert scores.OODScorer("energy").available() == ["energy"]
    with pytest.raises(ValueError, match="inconsistent shapes"):
        scores.OODScorer("knn", bank=np.zeros((5, 8)), means=np.zeros((2, 4)), precision=np.eye(4))


def test_predictor_scores_from_the_same_forward_pass(tmp_path: Path) -> None:
    from hierarchy.models.backbones import create_model
    from hierarchy.engine.predictor import Predictor
    from hierarchy.data.preset import Preset

    torch.manual_seed(0)
    model = create_model("resnet18", 2)[0].eval()
    rng = np.random.default_rng(0)
    batch = torch.from_numpy(rng.integers(0, 256, (6, 3, 32, 32), dtype=np.uint8))
    plain = Predictor.from_torch(model, ("a", "b"), Preset(size=32), device="cpu", precision="fp32")
    ref = plain.predict(batch, return_logits=True, return_features=True)
    x, y = ref.features, np.arange(6) % 2
    scorer, _ = fit.fit_scorer(x, y, method="knn", k=2)
    with_ood = Predictor.from_torch(model, ("a", "b"), Preset(size=32), device="cpu", precision="fp32",
                              ood_scorer=scorer)
    calls: list[int] = []
    with_ood.backend.model.register_forward_hook(lambda *_: calls.append(1))
    pred = with_ood.predict(batch)
    assert len(calls) == 1  # one forward pass gives probs and the OOD score
    assert pred.features is None and pred.ood is not None and pred.ood.dtype == np.float32
    np.testing.assert_allclose(pred.ood, scorer.score(ref.features, ref.logits),
                               atol=1e-4)
    np.testing.assert_allclose(pred.probs, ref.probs, atol=1e-6)


def test_metadata_entry_is_plain_json() -> None:
    row = fit.compare({"m": np.arange(5.0)}, {"m": np.arange(5.0) + 3})
    assert_plain_json(row)


def test_fitting_can_be_turned_off() -> None:
    from types import SimpleNamespace

    from hierarchy.config.train import TrainConfig

    assert train_ood.fit_for_run(SimpleNamespace(cfg=TrainConfig(ood=False)), None) == {}  # type: ignore[arg-type]


# ---------------------------------------------------------------- router: reject and stop


class ScoredPredictor:
    """Labels ('a', 'b') with confidence 0.9 for 'a'; OOD score = mean red channel; counts images."""

    def __init__(self, stored_threshold: float | None = None):
        from hierarchy.data.preset import Preset

        self.labels, self.preset, self.seen = ["a", "b"], Preset(size=8), 0
        self.metadata = {"ood": None if stored_threshold is None else {"threshold": stored_threshold}}

    def predict(self, batch: torch.Tensor) -> Prediction:
        self.seen += len(batch)
        n = len(batch)
        red = batch[:, 0].float().mean(dim=(1, 2)).numpy() / 255.0
        return Prediction(probs=np.tile([0.9, 0.1], (n, 1)).astype(np.float32), ood=red)


TWO_LEVEL = """\
name: two
root: gate
stages:
  gate: {stage: x, ood: OOD, routes: {a: next, b: stop}}
  next: {stage: y, ood: 'off', routes: {default: stop}}
"""


def route(ood_value: str, reds: list[int], stored: float | None = 0.5) -> tuple[list[dict], ScoredPredictor]:
    from PIL import Image

    from hierarchy.engine.pipeline import parse_pipeline
    from hierarchy.engine.router import Decoded, LoadedStage, Router, resolve_ood

    pipe = parse_pipeline(TWO_LEVEL.replace("OOD", ood_value), check_stages=False)
    gate, nxt = ScoredPredictor(stored), ScoredPredictor()
    stages = {sid: LoadedStage(sid, sid, p, None, resolve_ood(pipe.stages[sid].ood, p))
              for sid, p in (("gate", gate), ("next", nxt))}
    items = [Decoded(Path(f"{r}.png"), image=Image.new("RGB", (8, 8), (r, 0, 0))) for r in reds]
    return Router(pipe, stages).route(items), nxt


def test_router_rejects_over_threshold_and_stops() -> None:
    recs, nxt = route("auto", [10, 250, 100])  # scores 0.04, 0.98, 0.39 vs stored threshold 0.5
    assert [r["status"] for r in recs] == ["ok", "rejected", "ok"]
    rejected = recs[1]
    assert rejected["reason"] == "out_of_distribution" and rejected["label"] is None
    assert len(rejected["trace"]) == 1 and rejected["trace"][0]["decision"] == "rejected"
    assert rejected["trace"][0]["ood"] == {"score": pytest.approx(250 / 255), "threshold": 0.5}
    assert nxt.seen == 2  # the rejected image never reached the next stage
    assert recs[0]["trace"][0]["ood"]["score"] < 0.5 and "ood" not in recs[0]["trace"][1]  # next: ood off


def test_pipeline_ood_number_off_and_auto_without_stored_value() -> None:
    assert [r["status"] for r in route("0.3", [10, 100])[0]] == ["ok", "rejected"]
    assert [r["status"] for r in route("'off'", [250])[0]] == ["ok"]
    assert [r["status"] for r in route("auto", [250], stored=None)[0]] == ["ok"]  # no stored threshold


# ---------------------------------------------------------------- end to end on generated images

SYNTH_PIPE = """\
name: ood-e2e
root: gate
stages:
  gate: {{stage: skin_vs_nonskin, weights: {run}, ood: auto, routes: {{default: stop}}}}
"""


@pytest.fixture(scope="module")
def trained_gate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """skin_vs_nonskin trained from scratch at 32 px on two kinds of generated image (one colour and
    stripe pattern per label, hierarchy.data.synth.make_image_folder), OOD knn tuned on val as is. About 30 s
    on a busy shared 2-core machine. Over training seeds 0-2 knn rejected 92-100% of the textures. (The
    defaults, mahalanobis tuned on shifted val views, are measured on real new sources in docs/ood.md;
    on this toy model the shifted views loosen the threshold enough to let half the textures through.)

    Generated HAM10000 vs COCO scenes are not used here: their "non-skin" is an open class of random
    scenes, and a 32 px model trained from scratch separates grey textures from it unreliably
    (AUROC 0.68-0.94 over seeds, docs/ood.md), which would make this test flaky."""
    from hierarchy.registry import get_stage

    from hierarchy.config.load import load_stage_config
    from hierarchy.data.synth import make_image_folder

    root = tmp_path_factory.mktemp("ood_e2e")
    labels = ["skin", "non-skin"]
    make_image_folder(root / "data" / "train", labels, n_per_label=50, size=(48, 36), seed=0)
    make_image_folder(root / "data" / "val", labels, n_per_label=25, size=(48, 36), seed=1)
    cls = get_stage("skin_vs_nonskin")
    cfg = load_stage_config(cls, train={"pretrained": "none", "img_size": 32, "epochs": 2, "batch_size": 32,
                                        "device": "cpu", "workers": 0, "out": str(root / "runs"),
                                        "ood_method": "knn", "ood_tune": "val"})
    run = train_stage(cls(cfg), root / "data", progress=False)
    pipe = root / "pipe.yaml"
    pipe.write_text(SYNTH_PIPE.format(run=run))
    return run, pipe, root / "data"


def run_cli(pipe: Path, inputs: list[Path], out: Path) -> list[dict]:
    from hierarchy.commands.cli import main

    assert main(["run", str(pipe), *map(str, inputs), "--format", "jsonl", "-o", str(out), "--device", "cpu"]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_generated_textures_are_rejected_and_val_kept(trained_gate: tuple[Path, Path, Path], tmp_path: Path) -> None:
    from hierarchy.data.labelled import load_samples
    from hierarchy.data.synth import make_ood

    run, pipe, data = trained_gate
    meta = json.loads((run / "metadata.json").read_text())["ood"]
    assert meta["method"] == "knn" and meta["tune"]["views"] == "val" and meta["keep"] == 0.99
    assert (run / scores.OOD_FILE).is_file()
    assert set(meta["methods"]) == set(scores.METHODS) and meta["fit"]["split"] == "train"
    textures = make_ood(tmp_path / "textures", n=60, size=(48, 36), seed=7)
    recs = run_cli(pipe, [textures], tmp_path / "ood.jsonl")
    rejected = [r for r in recs if r["status"] == "rejected"]
    assert len(rejected) / len(recs) > 0.8, f"only {len(rejected)}/{len(recs)} textures rejected"
    assert all(r["reason"] == "out_of_distribution" and len(r["trace"]) == 1 for r in rejected)
    assert all(r["trace"][0]["ood"]["score"] > r["trace"][0]["ood"]["threshold"] == meta["threshold"] for r in rejected)
    val = [s.path for s in load_samples(data) if s.split == "val"]
    kept = np.mean([r["status"] != "rejected" for r in run_cli(pipe, val, tmp_path / "val.jsonl")])
    assert kept >= meta["keep"] - 0.03, f"kept {kept:.3f} of val, target {meta['keep']}"


def test_evaluate_with_ood_folder(trained_gate: tuple[Path, Path, Path], tmp_path: Path) -> None:
    from hierarchy.commands.cli import main
    from hierarchy.data.synth import make_ood

    _, pipe, data = trained_gate
    textures = make_ood(tmp_path / "textures", n=24, size=(48, 36), seed=8)
    out = tmp_path / "eval"
    assert main(["evaluate", str(pipe), str(data), "--split", "val", "--ood", str(textures), "--out", str(out),
                 "--device", "cpu"]) == 0
    report = json.loads((out / "report.json").read_text())["ood"]
    gate = report["stages"]["gate"]
    assert report["n"] == 24 and gate["auroc"] > 0.9 and gate["rejected"] > 0.8 and "scores_in" not in gate
    e2e = report["end_to_end"]
    assert e2e["rejected_at_root"] == e2e["rejected"] and e2e["accepted_as_error"] == pytest.approx(1 - e2e["rejected"])
    rc = report["risk_coverage"]
    assert rc["n_out"] == 24 and rc["with_ood_reject"]["aurc"] <= rc["with_ood_confidence"]["aurc"]
    for png in ("ood_scores_gate.png", "risk_coverage_ood.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## Out-of-distribution images" in (out / "report.md").read_text()

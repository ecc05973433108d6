"""Out-of-distribution (OOD) scores for a stage, computed from the stage's own model.

Three scores, all from the forward pass the predictor already runs (higher = less like the
training data):

* ``energy``: ``-logsumexp(logits)`` (Liu et al. 2020); needs no statistics.
* ``mahalanobis``: smallest Mahalanobis distance (squared) of the L2-normalised penultimate
  features to a class mean, with one covariance shared by all classes, shrunk towards a scaled
  identity with the Ledoit-Wolf estimate (Lee et al. 2018; normalising first as in Mueller & Hein
  2025 separated better here, see docs/ood.md). Stores ``means`` (C, D) and ``precision`` (D, D).
* ``knn``: Euclidean distance of the L2-normalised features to their k-th nearest neighbour in a
  class-stratified subsample of the train features (Sun et al. 2022). Stores ``bank`` (M, D), fp16.

:func:`fit_for_run` runs at the end of ``hierarchy train``: it fits every scorer on the TRAIN
split, tunes each threshold on the VAL split to keep ``ood_keep`` of it, writes ``ood.safetensors``
next to the weights and returns the ``ood`` entry of ``metadata.json``. See docs/ood.md.
"""
from __future__ import annotations

import hashlib
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import torch

from hierarchy.core.errors import CheckpointError
from hierarchy.ood.scores import DEFAULT_K, METHODS, OOD_FILE  # one definition for the torch and numpy scorers

if TYPE_CHECKING:
    from torch import nn

    from hierarchy.train.trainer import _Context

log = logging.getLogger("hierarchy.ood")

DEFAULT_METHOD = "knn"  # see docs/ood.md for the comparison behind this choice
FORMAT = "hierarchy.ood"
BANK_SIZE = 2000  # train features kept for knn (class-stratified subsample)
MAX_FIT_IMAGES = 20000  # train images used to fit (class-stratified subsample beyond this)
_CHUNK = 4096  # rows scored at once by knn, to bound the (N, M) similarity matrix


# ---------------------------------------------------------------- scores (torch, any device)


def energy_score(logits: torch.Tensor) -> torch.Tensor:
    """(N, C) raw logits -> (N,) ``-logsumexp``: low when some class is confidently matched."""
    return -torch.logsumexp(logits.float(), dim=1)


def mahalanobis_score(features: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """(N, D) features -> (N,) ``min_c (x - mu_c)^T P (x - mu_c)`` with the shared precision P."""
    x = features.float()
    xp = x @ precision
    quad = (xp * x).sum(dim=1, keepdim=True)  # x^T P x
    const = ((means @ precision) * means).sum(dim=1)  # mu^T P mu, per class
    return (quad - 2.0 * (xp @ means.T) + const).min(dim=1).values.clamp_min(0.0)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=1, eps=1e-12)


def knn_score(features: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """(N, D) features -> (N,) distance of the normalised feature to its k-th nearest bank row.

    ``bank`` must already be L2-normalised; ``k`` is clipped to the bank size."""
    k = max(1, min(int(k), bank.shape[0]))
    x = l2_normalize(features)
    out = []
    for start in range(0, x.shape[0], _CHUNK):
        sims = x[start:start + _CHUNK] @ bank.T
        kth = sims.topk(k, dim=1).values[:, -1]
        out.append((2.0 - 2.0 * kth).clamp_min(0.0).sqrt())
    return torch.cat(out) if out else torch.zeros(0, device=features.device)


# ---------------------------------------------------------------- fitting (numpy, float64)


def ledoit_wolf_shrinkage(x: np.ndarray) -> float:
    """Ledoit-Wolf shrinkage intensity in [0, 1] for centred rows ``x`` (N, D), as in scikit-learn."""
    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape
    if n < 2:
        return 1.0
    x2 = x ** 2
    trace_per_dim = x2.sum(axis=0) / n
    mu = trace_per_dim.sum() / d
    beta_ = float((x2.T @ x2).sum())
    delta_ = float(((x.T @ x) ** 2).sum()) / n ** 2
    beta = (beta_ / n - delta_) / (d * n)
    delta = (delta_ - 2.0 * mu * trace_per_dim.sum() + d * mu ** 2) / d
    return 0.0 if delta <= 0 else float(min(max(beta, 0.0), delta) / delta)


def fit_mahalanobis(features: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Class means (of the classes present), the shared shrunk precision matrix, and the shrinkage."""
    x, y = np.asarray(features, dtype=np.float64), np.asarray(targets)
    if x.ndim != 2 or len(x) != len(y) or len(x) < 2:
        raise ValueError(f"need (N >= 2, D) features with N targets, got {x.shape} and {len(y)}")
    classes = np.unique(y)
    means = np.stack([x[y == c].mean(axis=0) for c in classes])
    centred = x - means[np.searchsorted(classes, y)]
    shrinkage = ledoit_wolf_shrinkage(centred)
    cov = centred.T @ centred / len(x)
    scale = max(float(np.trace(cov)) / cov.shape[0], 1e-12)
    eye = np.eye(cov.shape[0])
    shrunk = (1.0 - shrinkage) * cov + shrinkage * scale * eye + 1e-6 * scale * eye
    return means.astype(np.float32), np.linalg.inv(shrunk).astype(np.float32), shrinkage


def stratified_subsample(targets: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of at most ``size`` rows, classes kept in proportion (each at least one)."""
    y = np.asarray(targets)
    if len(y) <= size:
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        take = max(1, round(size * len(idx) / len(y)))
        picked.append(rng.choice(idx, size=min(take, len(idx)), replace=False))
    return np.sort(np.concatenate(picked))[:size] if picked else np.zeros(0, int)


def fit_knn_bank(features: np.ndarray, targets: np.ndarray, size: int = BANK_SIZE, seed: int = 0) -> np.ndarray:
    """L2-normalised, class-stratified subsample (at most ``size`` rows) of the train features, fp16."""
    idx = stratified_subsample(targets, size, seed)
    bank = l2_normalize(torch.from_numpy(np.asarray(features, dtype=np.float32)[idx]))
    return bank.numpy().astype(np.float16)


# ---------------------------------------------------------------- the scorer the predictor uses


class OODScorer:
    """Fitted statistics plus the chosen ``method``; ``score`` maps one forward pass to (N,) scores."""

    def __init__(self, method: str = DEFAULT_METHOD, threshold: float | None = None, *,
                 means: torch.Tensor | None = None, precision: torch.Tensor | None = None,
                 bank: torch.Tensor | None = None, k: int = DEFAULT_K):
        if method not in METHODS:
            raise ValueError(f"unknown OOD method {method!r}; use one of {', '.join(METHODS)}")
        self.method, self.threshold, self.k = method, threshold, int(k)
        self.means, self.precision = means, precision
        self.bank = None if bank is None else bank.float()
        if method not in self.available():
            raise ValueError(f"OOD method {method!r} needs statistics that were not given")
        self._check_shapes()

    def _check_shapes(self) -> None:
        dims = {name: t.shape for name, t in (("means", self.means), ("precision", self.precision),
                                              ("bank", self.bank)) if t is not None}
        widths = {shape[-1] for shape in dims.values()}
        square = "precision" not in dims or dims["precision"][0] == dims["precision"][1]
        if any(len(shape) != 2 for shape in dims.values()) or len(widths) > 1 or not square:
            raise ValueError(f"inconsistent shapes {dims}: expected means (C, D), precision (D, D), bank (M, D)")

    def available(self) -> list[str]:
        """The methods this scorer has statistics for."""
        have = {"energy": True, "mahalanobis": self.means is not None and self.precision is not None,
                "knn": self.bank is not None}
        return [m for m in METHODS if have[m]]

    def to(self, device: torch.device | str) -> "OODScorer":
        for name in ("means", "precision", "bank"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        return self

    def score(self, features: torch.Tensor, logits: torch.Tensor, method: str | None = None) -> torch.Tensor:
        """(N,) float32 scores by ``method`` (default: the scorer's own), on the inputs' device."""
        method = method or self.method
        if method == "energy":
            return energy_score(logits)
        if method == "mahalanobis" and "mahalanobis" in self.available():
            return mahalanobis_score(l2_normalize(features), self.means, self.precision)  # type: ignore[arg-type]
        if method == "knn" and self.bank is not None:
            return knn_score(features, self.bank, self.k)
        raise ValueError(f"OOD method {method!r} is not available (have {', '.join(self.available())})")

    def score_all(self, features: torch.Tensor, logits: torch.Tensor) -> dict[str, np.ndarray]:
        """Every available method's scores as float64 numpy arrays (for fitting and evaluation)."""
        return {m: self.score(features, logits, m).double().cpu().numpy() for m in self.available()}

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"means": self.means, "precision": self.precision,
               "bank": None if self.bank is None else self.bank.half()}
        return {k: v.detach().cpu().contiguous() for k, v in out.items() if v is not None}


def fit_scorer(features: np.ndarray, targets: np.ndarray, method: str = DEFAULT_METHOD, k: int = DEFAULT_K,
               bank_size: int = BANK_SIZE, seed: int = 0) -> tuple[OODScorer, dict[str, Any]]:
    """Fit every method on train ``features``/``targets``; return the scorer and fit facts."""
    normalised = l2_normalize(torch.from_numpy(np.asarray(features, dtype=np.float32))).numpy()
    means, precision, shrinkage = fit_mahalanobis(normalised, targets)
    bank = fit_knn_bank(features, targets, bank_size, seed)
    scorer = OODScorer(method, means=torch.from_numpy(means), precision=torch.from_numpy(precision),
                       bank=torch.from_numpy(bank), k=k)
    facts = {"split": "train", "n": int(len(targets)), "dim": int(np.asarray(features).shape[1]),
             "classes": int(len(means)), "shrinkage": shrinkage, "bank": int(len(bank)), "k": int(k)}
    return scorer, facts


# ---------------------------------------------------------------- storage


def save_scorer(scorer: OODScorer, run_dir: Path) -> str:
    """Atomically write ``ood.safetensors`` into ``run_dir``; return its SHA-256."""
    from hierarchy.models.checkpoint import save_weights

    path = Path(run_dir) / OOD_FILE
    save_weights(path, scorer.tensors(), {"format": FORMAT, "method": scorer.method, "k": str(scorer.k)})
    return _sha256(path)


def load_scorer(ood: dict[str, Any] | None, run_dir: Path) -> OODScorer | None:
    """The scorer described by a checkpoint's ``ood`` metadata (None when there is none)."""
    if not ood or ood.get("method") is None:
        return None
    if ood["method"] == "energy" and not ood.get("file"):
        return OODScorer("energy", _threshold(ood))
    path = Path(run_dir) / str(ood.get("file") or OOD_FILE)
    if not path.is_file():
        raise CheckpointError(path, f"the checkpoint's OOD statistics are missing: copy {path.name} next to "
                              "metadata.json, or set the metadata's \"ood\" to null to run without OOD rejection")
    if ood.get("sha256") and _sha256(path) != ood["sha256"]:
        raise CheckpointError(path, "OOD statistics do not match metadata.json (SHA-256 differs); "
                              "they belong to another run")
    from hierarchy.models.checkpoint import load_weights

    t = load_weights(path)
    try:
        return OODScorer(str(ood["method"]), _threshold(ood), means=t.get("means"), precision=t.get("precision"),
                         bank=t.get("bank"), k=int((ood.get("fit") or {}).get("k", DEFAULT_K)))
    except ValueError as e:
        raise CheckpointError(path, f"invalid OOD statistics: {e}") from e


def _threshold(ood: dict[str, Any]) -> float | None:
    return None if ood.get("threshold") is None else float(ood["threshold"])


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---------------------------------------------------------------- features from a model


def extract(predictor: Any, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[np.ndarray, ...]:
    """(features (N, D), logits (N, C), targets (N,)) from uint8 batches, through ``predictor.predict``:
    the very computation ``hierarchy run`` does (prepared model, precision), so thresholds carry over."""
    feats, logits, ys = [], [], []
    for x, y in batches:
        if len(y) == 0:
            continue
        pred = predictor.predict(x, return_logits=True, return_features=True)
        feats.append(pred.features)
        logits.append(pred.logits)
        ys.append(np.asarray(y))
    if not feats:
        raise ValueError("no images to extract OOD features from")
    return np.concatenate(feats), np.concatenate(logits), np.concatenate(ys)


def tune(scores_in: dict[str, np.ndarray], keep: float) -> dict[str, dict[str, float]]:
    """Per method: the threshold keeping ``keep`` of the in-distribution scores, and the share kept."""
    from hierarchy.metrics.classification import threshold_for_tpr_in

    out = {}
    for m, s in scores_in.items():
        t = threshold_for_tpr_in(s, keep)
        out[m] = {"threshold": t, "kept": float((s <= t).mean())}
    return out


def compare(scores_in: dict[str, np.ndarray], scores_out: dict[str, np.ndarray],
            thresholds: dict[str, float] | None = None) -> dict[str, dict[str, float | None]]:
    """Per method: AUROC, FPR at 95% TPR and (with ``thresholds``) the share of OOD rejected."""
    from hierarchy.metrics.classification import fpr_at_tpr, ood_auroc

    out: dict[str, dict[str, float | None]] = {}
    for m in scores_in:
        row: dict[str, float | None] = {"auroc": ood_auroc(scores_in[m], scores_out[m]),
                                        "fpr95": fpr_at_tpr(scores_in[m], scores_out[m], 0.95)}
        if thresholds is not None and m in thresholds:
            row["rejected"] = float((scores_out[m] > thresholds[m]).mean()) if len(scores_out[m]) else None
        out[m] = row
    return out


# ---------------------------------------------------------------- at the end of `hierarchy train`


def fit_for_run(ctx: "_Context", model: "nn.Module") -> dict[str, Any]:
    """Fit on train, tune on val, sanity-check on generated textures; return ``{"ood": {...}}``."""
    cfg = ctx.cfg
    if not cfg.ood:
        return {}
    predictor = _predictor(ctx, model)
    train_f, _, train_y = extract(predictor, _train_batches(ctx))
    scorer, fit = fit_scorer(train_f, train_y, cfg.ood_method, cfg.ood_k, seed=cfg.seed)
    val = _score_batches(scorer, predictor, ctx.loaders.val)
    textures = _score_batches(scorer, predictor, _texture_batches(ctx.preset, cfg.batch_size))
    tuned = tune(val, float(cfg.ood_keep))
    scorer.threshold = tuned[scorer.method]["threshold"]
    sanity = compare(val, textures, {m: v["threshold"] for m, v in tuned.items()})
    entry = {"method": scorer.method, "threshold": scorer.threshold, "keep": float(cfg.ood_keep), "file": OOD_FILE,
             "sha256": save_scorer(scorer, ctx.run_dir), "fit": fit,
             "tune": {"split": "val", "n": len(val[scorer.method]), "kept": tuned[scorer.method]["kept"]},
             "methods": {m: {**tuned[m], **{f"textures_{k}": v for k, v in sanity[m].items()}} for m in tuned},
             "sanity_set": f"{len(textures[scorer.method])} generated grey stripes/checkerboards/noise "
                           "(hierarchy.data.synth.make_ood)"}
    _plot(ctx.run_dir, val[scorer.method], textures[scorer.method], scorer.threshold, scorer.method)
    _summary(entry)
    return {"ood": entry}


def _score_batches(scorer: OODScorer, predictor: Any, batches: Any) -> dict[str, np.ndarray]:
    feats, logits, _ = extract(predictor, batches)
    return scorer.score_all(torch.from_numpy(feats), torch.from_numpy(logits))


def _predictor(ctx: "_Context", model: "nn.Module") -> Any:
    """The best checkpoint as ``hierarchy run`` loads it (device and precision of the run)."""
    from hierarchy.models.checkpoint import load_weights
    from hierarchy.engine.torch_backend import TorchPredictor

    best = ctx.run_dir / "best.safetensors"
    if best.is_file():
        model.load_state_dict(load_weights(best))
    return TorchPredictor(model, ctx.stage.labels, ctx.preset, {}, device=ctx.device, precision=ctx.precision)


def _train_batches(ctx: "_Context") -> Any:
    """The train split, in order, without augmentation or class weighting (capped, stratified)."""
    from torch.utils.data import DataLoader

    from hierarchy.train.loader import ImageDataset, collate, default_workers

    ds = ctx.loaders.train.dataset
    keep = stratified_subsample(np.asarray(ds.targets), MAX_FIT_IMAGES, ctx.cfg.seed)
    plain = ImageDataset([ds.samples[i] for i in keep], list(ctx.stage.labels), ctx.preset, train=False, hflip=False)
    return DataLoader(plain, batch_size=ctx.cfg.batch_size, shuffle=False, collate_fn=collate,
                      num_workers=default_workers(ctx.cfg.workers))


def _texture_batches(preset: Any, batch_size: int, n: int = 60) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Generated textures (clearly unlike any photo) as uint8 batches, via the real JPEG + loader path."""
    import tempfile

    from hierarchy.data.decode import decode_uint8
    from hierarchy.data.synth import make_ood

    side = max(preset.size, 32)
    with tempfile.TemporaryDirectory(prefix="hierarchy-ood-") as tmp:
        files = sorted(make_ood(Path(tmp), n=n, size=(side, side), seed=12345).glob("*.jpg"))
        x = torch.stack([decode_uint8(f, [preset.size])[preset.size] for f in files])
    return [(x[i:i + batch_size], torch.zeros(len(x[i:i + batch_size]), dtype=torch.long))
            for i in range(0, len(x), batch_size)]


def _plot(run_dir: Path, scores_in: np.ndarray, scores_out: np.ndarray, threshold: float, method: str) -> None:
    try:
        from hierarchy.metrics.plots import plot_score_histogram
    except ImportError as exc:  # matplotlib missing: plots are optional output
        log.warning("skipping the OOD plot: %s", exc)
        return
    plot_score_histogram(scores_in, scores_out, Path(run_dir) / "ood_scores.png", threshold,
                         title=f"OOD score ({method}): val vs generated textures")


def _summary(entry: dict[str, Any]) -> None:
    parts = [f"{m} AUROC {_fmt(v.get('textures_auroc'))}" for m, v in entry["methods"].items()]
    print(f"ood: {entry['method']} threshold {entry['threshold']:.4g} keeps {entry['tune']['kept']:.3f} of val; "
          f"vs generated textures: {', '.join(parts)}", file=sys.stderr)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"

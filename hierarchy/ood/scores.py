"""Out-of-distribution (OOD) scores, in numpy: the one implementation every engine uses.

Three scores from the forward pass the predictor already runs (higher = less like the training data):

* ``energy``: ``-logsumexp(logits)`` (Liu et al. 2020); needs no statistics.
* ``mahalanobis``: smallest Mahalanobis distance (squared) of the L2-normalised penultimate
  features to a class mean, with one covariance shared by all classes, shrunk towards a scaled
  identity with the Ledoit-Wolf estimate (Lee et al. 2018; normalising first as in Mueller & Hein
  2025 separated better here, see docs/ood.md). Stores ``means`` (C, D) and ``precision`` (D, D).
* ``knn``: Euclidean distance of the L2-normalised features to their k-th nearest neighbour in a
  class-stratified subsample of the train features (Sun et al. 2022). Stores ``bank`` (M, D), fp16.

Features reach the host anyway (every backend returns numpy), so scoring is float32 numpy whatever
the engine; the statistics live in ``ood.safetensors`` beside the weights (read with
``safetensors.numpy``, no pickle). Fitting is in :mod:`hierarchy.ood.fit`.

**Class-relative scores.** A scorer may carry per-class ``offsets`` for a method: the score of an image
is then its raw score minus the offset of its predicted class (argmax of the logits). Tuning sets each
offset to that class's own ``keep`` quantile on val (:func:`hierarchy.ood.fit.class_offsets`), so the
threshold is 0 and every well-populated class keeps the same share of its images. A single quantile of
val as a whole is set by the widest class (a gate's diverse non-skin photos) and lets through whatever
is predicted as a tight class (skin) inside that spread (docs/ood.md).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from hierarchy.core.errors import CheckpointError

METHODS = ("energy", "mahalanobis", "knn")
DEFAULT_METHOD = "mahalanobis"  # see docs/ood.md for the comparison behind this choice
FORMAT = "hierarchy.ood"
OOD_FILE = "ood.safetensors"
DEFAULT_K = 5
_CHUNK = 4096  # rows scored at once by knn, to bound the (N, M) similarity matrix


def energy_score(logits: np.ndarray) -> np.ndarray:
    """(N, C) raw logits -> (N,) ``-logsumexp``."""
    z = np.asarray(logits, dtype=np.float32)
    top = z.max(axis=1, keepdims=True)
    return -(top[:, 0] + np.log(np.exp(z - top).sum(axis=1)))


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm (at least 1e-12), as ``torch.nn.functional.normalize``."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.float32(1e-12))


def mahalanobis_score(features: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """(N, D) features -> (N,) ``min_c (x - mu_c)^T P (x - mu_c)`` with the shared precision P."""
    x = np.asarray(features, dtype=np.float32)
    xp = x @ precision
    quad = (xp * x).sum(axis=1, keepdims=True)
    const = ((means @ precision) * means).sum(axis=1)
    return np.maximum((quad - 2.0 * (xp @ means.T) + const).min(axis=1), np.float32(0.0))


def knn_score(features: np.ndarray, bank: np.ndarray, k: int) -> np.ndarray:
    """(N, D) features -> (N,) distance of the normalised feature to its k-th nearest row of the
    (already L2-normalised) ``bank``; ``k`` is clipped to the bank size."""
    k = max(1, min(int(k), bank.shape[0]))
    x = l2_normalize(features)
    out = []
    for start in range(0, x.shape[0], _CHUNK):
        sims = x[start:start + _CHUNK] @ bank.T
        kth = np.partition(sims, sims.shape[1] - k, axis=1)[:, sims.shape[1] - k]
        out.append(np.sqrt(np.maximum(2.0 - 2.0 * kth, np.float32(0.0))))
    return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


class OODScorer:
    """Fitted statistics plus the chosen ``method``; ``score`` maps one forward pass (features and
    logits, numpy) to (N,) scores. Every engine uses this one implementation."""

    def __init__(self, method: str = DEFAULT_METHOD, threshold: float | None = None, *,
                 means: np.ndarray | None = None, precision: np.ndarray | None = None,
                 bank: np.ndarray | None = None, k: int = DEFAULT_K,
                 offsets: dict[str, np.ndarray] | None = None):
        if method not in METHODS:
            raise ValueError(f"unknown OOD method {method!r}; use one of {', '.join(METHODS)}")
        self.method, self.threshold, self.k = method, threshold, int(k)
        self.means = None if means is None else np.asarray(means, dtype=np.float32)
        self.precision = None if precision is None else np.asarray(precision, dtype=np.float32)
        self.bank = None if bank is None else np.asarray(bank, dtype=np.float32)
        if method not in self.available():
            raise ValueError(f"OOD method {method!r} needs statistics that were not given")
        _check_shapes(self.means, self.precision, self.bank)
        self.offsets: dict[str, np.ndarray] = {}
        for m, off in (offsets or {}).items():
            off = np.asarray(off, dtype=np.float32)
            if m not in METHODS or off.ndim != 1 or (self.means is not None and len(off) != len(self.means)):
                raise ValueError(f"offsets for {m!r} must be one value per class, got shape {off.shape}")
            self.offsets[m] = off

    def available(self) -> list[str]:
        """The methods this scorer has statistics for."""
        have = {"energy": True, "mahalanobis": self.means is not None and self.precision is not None,
                "knn": self.bank is not None}
        return [m for m in METHODS if have[m]]

    def score(self, features: np.ndarray, logits: np.ndarray, method: str | None = None) -> np.ndarray:
        """(N,) float32 scores by ``method`` (default: the scorer's own), class-relative where it has offsets."""
        method = method or self.method
        return self.relative(self.raw_score(features, logits, method), logits, method)

    def raw_score(self, features: np.ndarray, logits: np.ndarray, method: str) -> np.ndarray:
        """(N,) float32 scores by ``method`` before any class offset."""
        if method not in self.available():
            raise ValueError(f"OOD method {method!r} is not available (have {', '.join(self.available())})")
        if method == "energy":
            return energy_score(logits).astype(np.float32)
        if method == "mahalanobis":
            return mahalanobis_score(l2_normalize(features), self.means, self.precision)  # type: ignore[arg-type]
        return knn_score(features, self.bank, self.k)  # type: ignore[arg-type]

    def relative(self, raw: np.ndarray, logits: np.ndarray, method: str) -> np.ndarray:
        """``raw`` minus the offset of each row's predicted class (unchanged without offsets)."""
        off = self.offsets.get(method)
        if off is None or len(raw) == 0:
            return raw
        return (raw - off[np.asarray(logits).argmax(axis=1)]).astype(raw.dtype)

    def score_all(self, features: np.ndarray, logits: np.ndarray, raw: bool = False) -> dict[str, np.ndarray]:
        """Every available method's scores as float64 arrays (for fitting and evaluation); ``raw``:
        before class offsets."""
        one = self.raw_score if raw else self.score
        return {m: one(features, logits, m).astype(np.float64) for m in self.available()}

    def arrays(self) -> dict[str, np.ndarray]:
        """The statistics as stored in ``ood.safetensors`` (the bank in fp16)."""
        out = {"means": self.means, "precision": self.precision,
               "bank": None if self.bank is None else self.bank.astype(np.float16),
               **{f"offsets.{m}": off for m, off in self.offsets.items()}}
        return {k: np.ascontiguousarray(v) for k, v in out.items() if v is not None}


def _check_shapes(means: np.ndarray | None, precision: np.ndarray | None, bank: np.ndarray | None) -> None:
    dims = {name: a.shape for name, a in (("means", means), ("precision", precision), ("bank", bank))
            if a is not None}
    widths = {shape[-1] for shape in dims.values() if shape}
    square = "precision" not in dims or (len(dims["precision"]) == 2 and dims["precision"][0] == dims["precision"][1])
    if any(len(shape) != 2 for shape in dims.values()) or len(widths) > 1 or not square:
        raise ValueError(f"inconsistent shapes {dims}: expected means (C, D), precision (D, D), bank (M, D)")


def load_scorer(ood: dict[str, Any] | None, run_dir: Path) -> OODScorer | None:
    """The scorer a checkpoint's ``ood`` metadata describes (None when there is none), after checking
    its statistics file: present, SHA-256 as recorded, a plain safetensors file, finite values."""
    if not ood or ood.get("method") is None:
        return None
    threshold = None if ood.get("threshold") is None else float(ood["threshold"])
    if ood["method"] == "energy" and not ood.get("file"):
        return OODScorer("energy", threshold)
    path = Path(run_dir) / str(ood.get("file") or OOD_FILE)
    arrays = _load_statistics(path, ood.get("sha256"))
    try:
        return OODScorer(str(ood["method"]), threshold, means=arrays.get("means"),
                         precision=arrays.get("precision"), bank=arrays.get("bank"),
                         k=int((ood.get("fit") or {}).get("k", DEFAULT_K)),
                         offsets={k[len("offsets."):]: v for k, v in arrays.items() if k.startswith("offsets.")})
    except ValueError as e:
        raise CheckpointError(path, f"invalid OOD statistics: {e}") from e


def _load_statistics(path: Path, sha256: str | None) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from hierarchy.core.fsutil import sha256_file
    from hierarchy.models.metadata import sniff_safetensors

    if not path.is_file():
        raise CheckpointError(path, f"the checkpoint's OOD statistics are missing: copy {path.name} next to "
                              "metadata.json, or set the metadata's \"ood\" to null to run without OOD rejection")
    if sha256 and sha256_file(path) != sha256:
        raise CheckpointError(path, "OOD statistics do not match metadata.json (SHA-256 differs); "
                              "they belong to another run")
    problem = sniff_safetensors(path)
    if problem:
        raise CheckpointError(path, problem)
    try:
        arrays = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(path, f"corrupt safetensors file: {e}") from e
    for name, a in arrays.items():
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise CheckpointError(path, f"tensor '{name}' contains NaN/Inf")
    return arrays


def save_scorer(scorer: OODScorer, run_dir: Path) -> str:
    """Atomically write ``ood.safetensors`` into ``run_dir``; return its SHA-256."""
    from safetensors.numpy import save_file

    from hierarchy.core.fsutil import atomic_write_with, sha256_file

    path = Path(run_dir) / OOD_FILE
    header = {"format": FORMAT, "method": scorer.method, "k": str(scorer.k)}
    atomic_write_with(path, lambda tmp: save_file(scorer.arrays(), tmp, metadata=header))
    return sha256_file(path)

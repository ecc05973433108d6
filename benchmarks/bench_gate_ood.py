"""Which OOD score keeps real skin and stops the rest? Post-hoc comparison on one trained gate.

    python benchmarks/bench_gate_ood.py --run RUN_DIR --data DATASET [--dev-eval ../shared/data/dev_eval]

Features and logits come from the run through the shared predictor (torch engine). Every method is
fitted on the TRAIN split (bank, means, principal space) and its threshold tuned on VAL only, either
on val as it is (today's tuning) or on val seen through the training augmentations (``aug``: crops,
colour, JPEG, downscale: what a new source does to images); dev_eval, the scikit-image samples and
the real H&E histology (``bench_gate_quality.histology_samples``) only check. Methods (higher = more
out of distribution):

* ``msp``: minus the top softmax probability; ``energy``: minus logsumexp of the logits;
* ``mahalanobis``, ``knn``: today's scores on the fine-tuned features (train bank of both classes);
* ``knn-class``: kNN distance to the train rows of the *predicted* class only;
* ``vim``: Virtual-logit Matching (Wang et al. 2022), residual outside the train features' principal
  space, matched to the logits' scale;
* ``knn-frozen``: kNN on the ImageNet backbone's own pooled features (no fine-tuning; a second model);
* ``mahalanobis-blockN`` (``--layers``, timm backbones): Mahalanobis on the channel means and standard
  deviations of the fine-tuned model's N-th intermediate feature map (the layer-wise scores of Lee et
  al. 2018; low blocks see colour and texture, not the classes), and ``mahalanobis+blockN``: rejected
  when either ``mahalanobis`` or block N's score is (ranks on the tuning set, one threshold).

Printed: AUROC of dermoscopy (in) against each non-skin group, the share of dermoscopy kept at each
tuned threshold, and end to end (label skin and not rejected = passed) per group.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def features(predict: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], paths: list[str], preset: Any,
             batch: int = 64, augment: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """(features, logits) of ``paths`` decoded through ``preset`` (optionally augmented, uint8)."""
    import torch

    from hierarchy.data.batches import decode_batches, decode_item

    feats, logits = [], []
    for chunk in decode_batches([Path(p) for p in paths], lambda f: decode_item(f, [preset]), batch):
        x = np.stack([d.array(preset) for d in chunk if d.error is None])
        if augment is not None:
            x = np.stack([augment(torch.from_numpy(a)).numpy() for a in x])
        f, z = predict(x)
        feats.append(f)
        logits.append(z)
    return np.concatenate(feats), np.concatenate(logits)


def fit_vim(train_f: np.ndarray, train_z: np.ndarray, dim: int | None = None) -> Callable[..., np.ndarray]:
    """ViM from train features/logits: the head (W, b) by least squares (the logits are linear in the
    features), origin u = -pinv(W) b, principal space of (f - u), alpha = mean max-logit / mean residual."""
    from hierarchy.ood.scores import energy_score

    f = train_f.astype(np.float64)
    x1 = np.hstack([f, np.ones((len(f), 1))])
    sol = np.linalg.lstsq(x1, train_z.astype(np.float64), rcond=None)[0]
    w, b = sol[:-1].T, sol[-1]
    u = -np.linalg.pinv(w) @ b
    centred = f - u
    dim = dim or min(256, f.shape[1] // 2)
    _, vecs = np.linalg.eigh(centred.T @ centred / len(f))
    residual_basis = vecs[:, : f.shape[1] - dim]  # eigh: ascending, so the smallest directions
    alpha = train_z.max(axis=1).mean() / np.linalg.norm(centred @ residual_basis, axis=1).mean()

    def score(feats: np.ndarray, logits: np.ndarray) -> np.ndarray:
        v = alpha * np.linalg.norm((feats.astype(np.float64) - u) @ residual_basis, axis=1)
        return v + energy_score(logits)  # energy = -logsumexp: higher virtual logit or lower energy -> OOD

    return score


def scorers(train_f: np.ndarray, train_z: np.ndarray, train_y: np.ndarray, temperature: float) -> dict[str, Callable]:
    from hierarchy.ood.fit import fit_knn_bank, fit_mahalanobis
    from hierarchy.metrics.classification import softmax
    from hierarchy.ood.scores import energy_score, knn_score, l2_normalize, mahalanobis_score

    means, precision, _ = fit_mahalanobis(l2_normalize(train_f), train_y)
    bank = fit_knn_bank(train_f, train_y).astype(np.float32)
    banks = {c: fit_knn_bank(train_f[train_y == c], train_y[train_y == c]).astype(np.float32)
             for c in np.unique(train_y)}

    def knn_class(f: np.ndarray, z: np.ndarray) -> np.ndarray:
        pred, out = z.argmax(axis=1), np.zeros(len(f), np.float32)
        for c, rows in banks.items():
            out[pred == c] = knn_score(f[pred == c], rows, 5) if (pred == c).any() else 0
        return out

    return {"msp": lambda f, z: -softmax(z, temperature).max(axis=1), "energy": lambda f, z: energy_score(z),
            "mahalanobis": lambda f, z: mahalanobis_score(l2_normalize(f), means, precision),
            "knn": lambda f, z: knn_score(f, bank, 5), "knn-class": knn_class, "vim": fit_vim(train_f, train_z)}


def frozen_backbone(run: Path) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The run's backbone with its ImageNet weights and no fine-tuning: (pooled features, zeros)."""
    import torch

    from hierarchy.data.preset import Preset
    from hierarchy.models.backbones import create_model, features_and_logits
    from hierarchy.models.metadata import read_metadata

    meta = read_metadata(run / "metadata.json")
    weights = meta.model_dump(mode="json").get("weights") or {}
    model = create_model(f"{meta.arch['library']}/{meta.arch['backbone']}".replace("timm/tf_", "timm/"),
                         len(meta.labels), pretrained=str(weights.get("tag") or "imagenet"))[0].eval()
    preset = Preset.from_dict(meta.preset)

    def predict(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            f, z = features_and_logits(model, preset.normalize(torch.from_numpy(x)))
        return f.numpy(), z.numpy()

    return predict


def intermediate(run: Path) -> tuple[Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], list[slice]]:
    """The fine-tuned model's intermediate feature maps, each pooled to (channel means, channel stds) and
    concatenated, with its logits; and the column slice of each block."""
    import torch

    from hierarchy.data.preset import Preset
    from hierarchy.engine.backends.torch_backend import build_model
    from hierarchy.models.metadata import read_metadata

    meta = read_metadata(run / "metadata.json")
    model = build_model(meta, run / "best.safetensors").eval()
    if not hasattr(model, "forward_intermediates"):
        raise SystemExit(f"--layers needs a timm backbone with forward_intermediates; {meta.arch['backbone']} has none")
    preset = Preset.from_dict(meta.preset)
    with torch.inference_mode():  # timm's feature_info is a list on some models, an object on others
        probe = model.forward_intermediates(torch.zeros(1, 3, preset.size, preset.size), intermediates_only=True)
    bounds = np.cumsum([0] + [2 * t.shape[1] for t in probe])

    def predict(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            final, maps = model.forward_intermediates(preset.normalize(torch.from_numpy(x)))
            pooled = torch.cat([torch.cat([t.mean((2, 3)), t.std((2, 3))], 1) for t in maps], 1)
            logits = model.forward_head(final)
        return pooled.numpy(), logits.numpy()

    return predict, [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def block_scorers(train_f: np.ndarray, train_y: np.ndarray, blocks: list[slice]) -> dict[str, Callable]:
    """``mahalanobis-blockN``: the fine-tuned Mahalanobis score on block N's pooled columns only."""
    from hierarchy.ood.fit import fit_mahalanobis
    from hierarchy.ood.scores import l2_normalize, mahalanobis_score

    def one(cols: slice) -> Callable:
        means, precision, _ = fit_mahalanobis(l2_normalize(train_f[:, cols]), train_y)
        return lambda f, z: mahalanobis_score(l2_normalize(f[:, cols]), means, precision)

    return {f"mahalanobis-block{i}": one(cols) for i, cols in enumerate(blocks)}


def auroc(score_in: np.ndarray, score_out: np.ndarray) -> float:
    from hierarchy.metrics.thresholds import ood_auroc

    return float(ood_auroc(score_in, score_out))


def study(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    import bench_gate_quality as gq
    from hierarchy.config.train import AugmentConfig
    from hierarchy.data.labelled import read_manifest
    from hierarchy.engine.predictor import load_predictor
    from hierarchy.ood.fit import stratified_subsample
    from hierarchy.registry import get_stage
    from hierarchy.train.augment import Augment

    run, dev = Path(args.run), Path(args.dev_eval)
    stage = get_stage("skin_vs_nonskin")
    pred = load_predictor(stage, run, engine="torch", precision="fp32")
    predict = lambda x: (lambda p: (p.features, p.logits))(pred.predict(x, return_logits=True, return_features=True))
    samples = read_manifest(Path(args.data))
    labels = list(stage.labels)
    train = [s for s in samples if s.split == "train"]
    keep = stratified_subsample(np.array([labels.index(s.label) for s in train]), args.fit_images)
    train = [train[i] for i in keep]
    val = [s for s in samples if s.split == "val" and s.label == "skin"][: args.val_images]
    rows = gq.dev_eval_rows(dev, args.eval_per_group, Path(args.out) / "skimage",
                            histology=Path(args.out) / "histology")
    groups = np.array([r["group"] for r in rows])
    photometric = {k: v for k, v in gq.ROBUST_AUGMENT.items() if k in ("color_jitter", "hue", "jpeg_quality", "downscale", "p")}
    aug = Augment(True, AugmentConfig(**photometric))
    models = {"fine-tuned": predict, "frozen": frozen_backbone(run)}
    blocks: list[slice] = []
    if args.layers:
        models["blocks"], blocks = intermediate(run)
    scores: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for model_name, fn in models.items():
        tr_f, tr_z = features(fn, [str(s.path) for s in train], pred.preset)
        tr_y = np.array([labels.index(s.label) for s in train])
        va = features(fn, [str(s.path) for s in val], pred.preset)
        torch.manual_seed(0)
        va_aug = features(fn, [str(s.path) for s in val], pred.preset, augment=aug)
        ev = features(fn, [str(dev / r["path"]) for r in rows], pred.preset)
        methods = block_scorers(tr_f, tr_y, blocks) if model_name == "blocks" else scorers(tr_f, tr_z, tr_y,
                                                                                           pred.temperature)
        if model_name == "frozen":
            methods = {"knn-frozen": methods["knn"]}
        for name, score in methods.items():
            scores[name] = {"val": (score(*va), score(*ev)), "aug": (score(*va_aug), score(*ev))}
        if model_name == "fine-tuned":  # every score is checked on top of the gate's own label
            said_skin = ev[1].argmax(axis=1) == labels.index("skin")
    for name in [m for m in scores if m.startswith("mahalanobis-block")]:
        scores[f"mahalanobis+{name.split('-')[1]}"] = union(scores["mahalanobis"], scores[name])
    return {name: summarise(tuned, said_skin, groups) for name, tuned in scores.items()}


def union(a: dict[str, tuple], b: dict[str, tuple]) -> dict[str, tuple]:
    """Reject when either score does: each score mapped to its rank in the tuning set (0-1, and past 1 beyond
    the set's largest score, so nothing beyond every tuning image ties with it), the larger of the two;
    one threshold then keeps the stated share of the tuning set under both."""
    def cdf(ref: np.ndarray, x: np.ndarray) -> np.ndarray:
        r = np.sort(ref)
        beyond = 1.0 + (x - r[-1]) / max(float(r[-1] - r[0]), 1e-12)
        return np.where(x > r[-1], beyond, np.interp(x, r, np.linspace(0.0, 1.0, len(r))))

    out = {}
    for split in a:
        (ta, ea), (tb, eb) = a[split], b[split]
        out[split] = (np.maximum(cdf(ta, ta), cdf(tb, tb)), np.maximum(cdf(ta, ea), cdf(tb, eb)))
    return out


TUNINGS = (("val", 0.99), ("val", 0.995), ("val", 0.999), ("aug", 0.99), ("aug", 0.995))


def summarise(tuned: dict[str, tuple[np.ndarray, np.ndarray]], said_skin: np.ndarray,
              groups: np.ndarray) -> dict[str, Any]:
    """AUROC per group, and per tuning (val or aug views: (tuning scores, dev_eval scores)) and keep share,
    the share passed (dermoscopy) or stopped (the rest) end to end."""
    s_ev = tuned["val"][1]
    derm = s_ev[groups == "dermoscopy"]
    out: dict[str, Any] = {"auroc": {g: auroc(derm, s_ev[groups == g]) for g in np.unique(groups) if g != "dermoscopy"}}
    for split, keep in TUNINGS:
        ref, ev = tuned[split]
        passed = said_skin & (ev <= float(np.quantile(ref, keep)))
        out[f"{split}@{keep}"] = {g: float(passed[groups == g].mean() if g == "dermoscopy" else (~passed[groups == g]).mean())
                       for g in np.unique(groups)}
    return out


def render(result: dict[str, Any]) -> str:
    """One AUROC table, then one end-to-end table per tuning."""
    groups = sorted({g for r in result.values() for g in r["val@0.99"]}, key=lambda g: (g != "dermoscopy", g))
    others = [g for g in groups if g != "dermoscopy"]
    lines = ["| AUROC (dermoscopy vs) | " + " | ".join(others) + " |", "|" + "---|" * (1 + len(others))]
    lines += [f"| {name} | " + " | ".join(f"{r['auroc'][g]:.4f}" for g in others) + " |" for name, r in result.items()]
    lines += ["", "| method | tuned on | " + " | ".join(groups) + " |", "|" + "---|" * (2 + len(groups))]
    for split, keep in TUNINGS:
        tuning = f"{split}@{keep}"
        lines += [f"| {name} | {tuning} | " + " | ".join(f"{r[tuning][g]:.4f}" for g in groups) + " |"
                  for name, r in result.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True)
    p.add_argument("--data", required=True, help="the dataset the run was trained on (manifest.csv)")
    p.add_argument("--dev-eval", default=str(REPO.parent / "shared" / "data" / "dev_eval"))
    p.add_argument("--fit-images", type=int, default=3000, help="train images the scores are fitted on")
    p.add_argument("--val-images", type=int, default=1000, help="val skin images thresholds are tuned on")
    p.add_argument("--eval-per-group", type=int, default=None)
    p.add_argument("--out", default="/tmp/hierarchy-gate-ood")
    p.add_argument("--layers", action="store_true", help="also score each intermediate block (timm backbones)")
    args = p.parse_args(argv)
    from hierarchy.core.machine import header

    result = study(args)
    print(header())
    print("thresholds keep a share of val skin (val: as is; aug: through the photometric training augmentations: "
          "colour, JPEG, downscale); dermoscopy = passed, other groups = stopped (labelled non-skin or rejected)")
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

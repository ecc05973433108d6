"""hierarchy calibrate RUN_DIR --data DATA: refit temperature and abstention threshold on labelled data."""
from __future__ import annotations

import argparse

from hierarchy.commands import add_inference_options, whole_number


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="refit a run's temperature and tune its threshold on labelled data",
                       description="Predict DATA with the run's model, refit temperature scaling (unless "
                       "--no-temperature), tune the abstention threshold to a target (the lowest threshold that "
                       "meets it; the highest for --target-coverage) and update RUN_DIR/metadata.json atomically. "
                       "A pipeline with `threshold: auto` then uses the stored threshold. Without a target flag, "
                       "the run's stored target (or train.threshold_target, or max_risk 0.01) is used. "
                       "See docs/evaluation.md.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="training run directory (or its metadata.json / weights)")
    p.add_argument("--data", required=True, metavar="DATA", help="labelled data: build-dataset output, "
                   "ImageFolder tree, train/ val/ tree or CSV path,label")
    p.add_argument("--split", choices=("train", "val", "test", "all"),
                   help="which split (default: val when the data has splits, else all)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--target-precision", type=float, metavar="P", help="precision of --label among accepted")
    target.add_argument("--target-coverage", type=float, metavar="C", help="share of items accepted")
    target.add_argument("--max-risk", type=float, metavar="R", help="error rate among accepted items")
    p.add_argument("--label", metavar="L", help="the label --target-precision is about")
    p.add_argument("--target-recall", action="append", default=[], metavar="LABEL=R",
                   help="also tune a decision threshold for LABEL (the highest p(LABEL) from which it wins ahead "
                   "of argmax) reaching recall R on DATA; repeatable; stored for `decide: auto` in a pipeline")
    p.add_argument("--no-temperature", dest="temperature", action="store_false",
                   help="keep the stored temperature; only tune the threshold")
    p.add_argument("--views", type=whole_number(0, 32), metavar="N", help="fit the temperature on N views of each image through "
                   "the run's training augmentation, as train.calibration_views does (default: the run's "
                   "train.calibration_views; 0 = the images as is); the threshold is tuned on the images as is")
    ood = p.add_argument_group("OOD score (docs/ood.md)")
    ood.add_argument("--ood", action="store_true", help="instead: refit the run's OOD score on DATA's train split "
                     "and tune its threshold on its val split (DATA: a build-dataset output)")
    ood.add_argument("--ood-method", choices=("mahalanobis", "knn", "energy"), help="default: the run's")
    ood.add_argument("--ood-keep", type=float, metavar="Q", help="share of val the threshold keeps (default: the run's)")
    ood.add_argument("--ood-tune", choices=("shifted", "val"), help="tune on colour/JPEG/resolution-shifted val "
                     "views, or on val as is (default: the run's)")
    ood.add_argument("--ood-per-class", action=argparse.BooleanOptionalAction, default=None,
                     help="keep Q of each predicted class (class offsets) rather than of val as a whole "
                     "(default: the run's, else on)")
    ood.add_argument("--ood-fit-aperture", type=float, metavar="SHARE", help="also fit on this share of train images "
                     "seen through a round field of view (default: the run's, else 0)")
    p.add_argument("--format", choices=("table", "json"), default="table")
    add_inference_options(p, workers=False)
    p.set_defaults(func=run)


def target_from_args(args: argparse.Namespace) -> dict | None:
    """The target the flags ask for (None = use the run's default); raises ConfigError on misuse."""
    from hierarchy.core.errors import ConfigError

    if args.label is not None and args.target_precision is None:
        raise ConfigError("command line", ["--label only applies to --target-precision"])
    if args.target_precision is not None:
        if args.label is None:
            raise ConfigError("command line", ["--target-precision needs --label (the label it is about)"])
        return {"target_precision": args.target_precision, "label": args.label}
    if args.target_coverage is not None:
        return {"target_coverage": args.target_coverage}
    return {"max_risk": args.max_risk} if args.max_risk is not None else None


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    if args.ood:
        from hierarchy.evaluate.ood_refit import refit_ood, render as render_ood

        result = refit_ood(Path(args.run_dir), Path(args.data), method=args.ood_method, keep=args.ood_keep,
                           tune_on=args.ood_tune, per_class=args.ood_per_class,
                           fit_aperture=args.ood_fit_aperture, device=args.device,
                           precision=args.precision, engine=args.engine, batch_size=args.batch_size or 64)
        print(json.dumps(result, indent=2) if args.format == "json" else render_ood(result))
        return 0
    from hierarchy.evaluate.calibrate import calibrate_run, render

    summary = calibrate_run(Path(args.run_dir), Path(args.data), split=args.split, target=target_from_args(args),
                            refit_temperature=args.temperature, device=args.device, precision=args.precision,
                            engine=args.engine, batch_size=args.batch_size or 32, target_recall=args.target_recall,
                            views=args.views)
    print(json.dumps(summary, indent=2) if args.format == "json" else render(summary))
    return 0

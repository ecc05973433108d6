"""The markdown of a model card (:mod:`hierarchy.engine.card`): a plain, readable page of its fields."""
from __future__ import annotations

from typing import Any


def _f(x: Any) -> str:
    return "-" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def render_card(card: dict[str, Any]) -> str:
    lines = [f"# Model card: {card['name']}", "",
             f"_{card['kind']} card written {card['created_at']} by {card['created_by']}. The sections "
             "Intended use, Out of scope and Limitations are editable (`hierarchy card --intended-use ...`); "
             "everything else is regenerated from the files._", "",
             "## Intended use", "", card["intended_use"], "", "## Out of scope", "", card["out_of_scope"], ""]
    if card.get("description"):
        lines[2:2] = [card["description"], ""]
    if card["kind"] == "run":
        lines += _run_sections(card, "##")  # its evaluations among them
    else:
        lines += ["## Cascade", "", f"Root `{card['root']}`; order: {' -> '.join(card['order'])}.", ""]
        for sid, st in card["stages"].items():
            lines += [f"## Stage `{sid}` ({st['stage']})", "",
                      f"threshold {st.get('threshold')}, decide {st.get('decide') or '-'}, ood {st.get('ood')}, "
                      f"routes {st.get('routes')}", ""]
            lines += _run_sections(st["card"], "###") if st.get("card") else [f"(no card: {st.get('error', 'no weights')})", ""]
        lines += _evaluations(card.get("evaluations") or [], "##")
    lines += ["## Limitations", ""] + [f"- {x}" for x in card["limitations"]] + [""]
    lines += ["## Hashes", ""] + [f"- {k}: `{v}`" for k, v in card["hashes"].items()] + [""]
    return "\n".join(lines)


def _run_sections(card: dict[str, Any], h: str) -> list[str]:
    td, rec, val = card["training_data"], card["recipe"], card["validation"]
    lines = [f"{h} Training data", "", f"- dataset `{td.get('path')}` (manifest sha256 `{td.get('manifest_sha256')}`)",
             f"- sources: {', '.join(s for s in td.get('sources') or [] if s) or '-'}", ""]
    counts = td.get("counts") or {}  # split -> label -> n
    if counts:
        labels = list(dict.fromkeys(lab for c in counts.values() for lab in c))
        lines += _table(["label"] + list(counts), [[lab] + [str(counts[s].get(lab, 0)) for s in counts]
                                                   for lab in labels]) + [""]
    train = rec.get("train") or {}
    lines += [f"{h} Recipe", "", f"- {rec['arch'].get('backbone')} ({rec['arch'].get('library')}), "
              f"{rec['arch'].get('num_classes')} classes, input {rec['preset'].get('size')} px",
              f"- epochs {train.get('epochs')}, batch {train.get('batch_size')}, lr {train.get('lr')}, "
              f"pretrained {train.get('pretrained')}, seed {train.get('seed')}", *_regularisation(train), "",
              f"{h} Validation", "", f"- best: {', '.join(f'{k} {_f(v)}' for k, v in (val['best'] or {}).items()) or '-'}",
              f"- temperature {_f(val['temperature'])}; threshold "
              f"{_f((val['threshold'] or {}).get('threshold'))} for {(val['threshold'] or {}).get('target')}"]
    if val.get("decide"):
        lines.append(f"- decision thresholds {val['decide'].get('thresholds')} (targets {val['decide'].get('target')}, "
                     f"met {val['decide'].get('met')})")
    ood = card.get("ood") or {}
    lines += ["", f"{h} Out-of-distribution behaviour", "",
              _ood_line(ood) if ood else "- no OOD scorer fitted: unlike images are not rejected", ""]
    lines += _evaluations(card.get("evaluations") or [], h)
    lines += [f"{h} Versions", "", ", ".join(f"{k} {v}" for k, v in (card.get("versions") or {}).items()) or "-", "",
              f"weights sha256 `{card['hashes']['weights_sha256']}`", ""]
    return lines


def _ood_line(ood: dict[str, Any]) -> str:
    """The reject rule, how its threshold was tuned, and what it kept of the tuning set (and of plain val,
    when the tuning set was shifted views of it)."""
    tune = ood.get("tune") or {}
    shifted = tune.get("views") == "shifted"
    how = ""
    if ood.get("keep"):
        per_class = " per predicted class" if tune.get("per_class") else ""
        how = f", tuned{per_class} to keep {ood['keep']:.1%} of {'shifted views of ' if shifted else ''}val"
    kept = [f"{tune['kept']:.1%} of those"] if isinstance(tune.get("kept"), float) else []
    if shifted and isinstance(tune.get("kept_plain_val"), float):
        kept.append(f"{tune['kept_plain_val']:.1%} of val as it is")
    line = f"- {ood.get('method', 'score')} reject above {_f(ood.get('threshold'))} (fitted on the train split{how})"
    return line + (f"; it keeps {' and '.join(kept)}" if kept else "")


def _regularisation(train: dict[str, Any]) -> list[str]:
    """The recipe beyond epochs and learning rate: optimiser, schedule, smoothing, EMA and the augmentations
    that are on (a part left at its off value is not listed)."""
    parts = [f"{k.replace('_', ' ')} {train[k]}" for k in ("optimizer", "weight_decay", "schedule", "warmup_epochs",
                                                           "label_smoothing", "ema") if train.get(k)]
    aug = {k.replace('_', ' '): v for k, v in (train.get("augment") or {}).items() if v not in (None, False, 0, 0.0)
           and k not in ("p", "crop_ratio", "aperture_radius")}
    return ([f"- {', '.join(parts)}"] if parts else []) + (
        [f"- augment: {', '.join(f'{k} {v}' for k, v in aug.items())}"] if aug else [])


def _evaluations(evals: list[dict[str, Any]], h: str) -> list[str]:
    if not evals:
        return [f"{h} Evaluations", "", "No evaluation report found (run `hierarchy evaluate` and pass "
                "`--report DIR`).", ""]
    lines = [f"{h} Evaluations", ""]
    lines += _table(["report", "data (split)", "n", "accuracy", "coverage"],
                    [[f"`{e['path']}`", f"`{e['data']}` ({e['split']})", _f(e["n"]), _f(e["accuracy"]), _f(e["coverage"])]
                     for e in evals]) + [""]
    for e in evals:
        for col, sg in e["subgroups"].items():
            w = sg.get("worst") or {}
            lines += [f"Subgroups by `{col}` ({e['path']}), end-to-end accuracy; worst: {w.get('group', '-')}", ""]
            lines += _table(["group", "n", "accuracy [95% CI]"],
                            [[g + (" *" if v["small_n"] else ""), str(v["n"]), _ci(v["accuracy"])]
                             for g, v in sg["groups"].items()]) + [""]
        if e.get("ood"):
            lines += [f"OOD ({e['path']}): " + ", ".join(f"{k} {_f(v)}" for k, v in e["ood"].items()), ""]
    return lines


def _ci(m: dict[str, Any]) -> str:
    ci = m.get("ci")
    return _f(m.get("value")) + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")

"""Render run records as table, json, jsonl or csv, streaming, to stdout or atomically to a file."""
from __future__ import annotations

import contextlib
import csv
import json
import sys
from typing import IO, Any, Iterable, Iterator

from hierarchy.core.fsutil import atomic_open

FORMATS = ("table", "json", "jsonl", "csv")
CSV_FIELDS = ["path", "status", "label", "confidence", "stage", "reason", "trace", "error_type", "error_message"]


def trace_summary(rec: dict[str, Any]) -> str:
    return " > ".join(f"{t['stage']}:{t['label']}({t['confidence']:.2f})" for t in rec.get("trace", []))


def _csv_row(rec: dict[str, Any]) -> dict[str, Any]:
    err = rec.get("error") or {}
    conf = rec.get("confidence")
    return {"path": rec["path"], "status": rec["status"], "label": rec.get("label") or "",
            "confidence": "" if conf is None else f"{conf:.6f}", "stage": rec.get("stage") or "",
            "reason": rec.get("reason") or "", "trace": trace_summary(rec),
            "error_type": err.get("type", ""), "error_message": err.get("message", "")}


def _table_lines(records: Iterable[dict[str, Any]]) -> Iterator[str]:
    yield f"{'path':<40} {'status':<10} {'label':<20} {'conf':>6}  trace / error"
    for rec in records:
        path = rec["path"] if len(rec["path"]) <= 40 else "..." + rec["path"][-37:]
        conf = "" if rec.get("confidence") is None else f"{rec['confidence']:.3f}"
        detail = trace_summary(rec) if rec["status"] != "error" else f"{rec['error']['type']}: {rec['error']['message']}"
        yield f"{path:<40} {rec['status']:<10} {rec.get('label') or '-':<20} {conf:>6}  {detail}"


def write_records(records: Iterable[dict[str, Any]], fmt: str, out: IO[str]) -> None:
    """Write records as they arrive (nothing is held in memory except for column-free formats)."""
    if fmt == "jsonl":
        for rec in records:
            out.write(json.dumps(rec) + "\n")
            out.flush()
    elif fmt == "json":
        out.write("[")
        for n, rec in enumerate(records):
            out.write(("," if n else "") + "\n  " + json.dumps(rec))
        out.write("\n]\n")
    elif fmt == "csv":
        w = csv.DictWriter(out, fieldnames=CSV_FIELDS, lineterminator="\n")
        w.writeheader()
        for rec in records:
            w.writerow(_csv_row(rec))
    elif fmt == "table":
        for line in _table_lines(records):
            out.write(line + "\n")
    else:
        raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")


@contextlib.contextmanager
def open_output(path: str | None) -> Iterator[IO[str]]:
    """stdout (surrogate-escaped so non-UTF-8 file names pass through) or an atomically written file."""
    if path in (None, "-"):
        with contextlib.suppress(AttributeError, ValueError):
            sys.stdout.reconfigure(errors="surrogateescape")  # type: ignore[union-attr]
        yield sys.stdout
        sys.stdout.flush()
    else:
        with atomic_open(path, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
            yield f

"""Render run records as table, json, jsonl or csv to stdout or a file.

To a file, ``jsonl`` streams: each record is one complete line, flushed as it is written, so a
killed run keeps every record written so far and ``--resume`` (:func:`recorded_paths`) continues it.
``table``, ``json`` and ``csv`` are written atomically at the end (temp file + rename): the file is
either the whole result or absent. Write faults (a directory, a missing folder, no permission, a
full disk) are :class:`~hierarchy.core.errors.OutputError`, checked before any image is decoded
where they can be (:func:`check_output`).
"""
from __future__ import annotations

import contextlib
import csv
import errno
import json
import os
import sys
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

from hierarchy.core.errors import OutputError
from hierarchy.core.fsutil import atomic_open

FORMATS = ("table", "json", "jsonl", "csv")
STREAMED = ("jsonl",)  # formats appended record by record to a file (resumable); the rest are atomic
# OWASP CSV injection: a cell starting with one of these is a formula in Excel/LibreOffice/Sheets
FORMULA_CHARS = ("=", "+", "-", "@", "\t", "\r")
CSV_FIELDS = ["path", "status", "label", "confidence", "stage", "reason", "trace", "error_type", "error_message"]


def trace_summary(rec: dict[str, Any]) -> str:
    return " > ".join(f"{t['stage']}:{t['label']}({t['confidence']:.2f})" for t in rec.get("trace", []))


def csv_cell(value: str) -> str:
    """``value`` made safe for a spreadsheet (OWASP "CSV Injection"): a cell that starts with
    ``= + - @``, tab or carriage return gets a leading ``'`` so it is shown as text, never run as a
    formula (``=cmd()|x.jpg`` -> ``'=cmd()|x.jpg``). The csv module does the quoting."""
    return "'" + value if value.startswith(FORMULA_CHARS) else value


def _csv_row(rec: dict[str, Any]) -> dict[str, Any]:
    err = rec.get("error") or {}
    conf = rec.get("confidence")
    row = {"path": rec["path"], "status": rec["status"], "label": rec.get("label") or "",
           "stage": rec.get("stage") or "", "reason": rec.get("reason") or "", "trace": trace_summary(rec),
           "error_type": err.get("type", ""), "error_message": err.get("message", "")}
    row = {k: csv_cell(str(v)) for k, v in row.items()}
    return {**row, "confidence": "" if conf is None else f"{conf:.6f}"}


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


def check_output(path: str | None, resume: bool = False) -> None:
    """Fail before any work when ``-o path`` cannot be written: a directory, a missing parent
    folder, no write permission. (A full disk can only be found while writing.)"""
    if path in (None, "-"):
        return
    target = Path(path)
    if target.is_dir():
        raise OutputError(path, "is a directory; give a file name")
    if not target.parent.is_dir():
        raise OutputError(path, f"folder {target.parent} does not exist")
    if target.exists() and not os.access(target, os.W_OK):
        raise OutputError(path, "permission denied")
    if not os.access(target.parent, os.W_OK | os.X_OK) and not (resume and target.exists()):
        raise OutputError(path, f"permission denied: cannot create files in {target.parent}")


def recorded_paths(path: str | os.PathLike) -> set[str]:
    """The ``path`` of every complete record in a jsonl output (for ``--resume``). A torn last line
    (the run was killed mid-write) is cut off the file so that input is redone; a missing file is
    an empty set."""
    done: set[str] = set()
    try:
        f = open(path, "r+b")
    except FileNotFoundError:
        return done
    with f:
        good = 0  # byte offset after the last complete, parseable line
        for line in f:
            try:
                rec = json.loads(line) if line.endswith(b"\n") else None
            except ValueError:
                rec = None
            if not isinstance(rec, dict) or "path" not in rec:
                break
            done.add(rec["path"])
            good += len(line)
        f.truncate(good)
    return done


def write_stream(records: Iterable[dict[str, Any]], fmt: str, path: str | None, append: bool = False) -> None:
    """Write ``records`` to ``path`` (stdout for None/-) in ``fmt``: jsonl streams to a file (opened
    for appending when ``append``), the other formats replace it atomically at the end."""
    with _open_output(path, fmt, append) as out:
        try:
            write_records(records, fmt, out)
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise _output_error(path, exc) from exc


@contextlib.contextmanager
def _open_output(path: str | None, fmt: str, append: bool) -> Iterator[IO[str]]:
    """stdout (surrogate-escaped so non-UTF-8 file names pass through), a streamed file, or an
    atomically written one; OSErrors while opening or closing become :class:`OutputError`."""
    if path in (None, "-"):
        with contextlib.suppress(AttributeError, ValueError):
            sys.stdout.reconfigure(errors="surrogateescape")  # type: ignore[union-attr]
        yield sys.stdout
        sys.stdout.flush()
        return
    try:
        with _file(path, fmt, append) as f:
            yield f
    except OutputError:
        raise
    except OSError as exc:
        raise _output_error(path, exc) from exc


def _file(path: str, fmt: str, append: bool) -> contextlib.AbstractContextManager[IO[str]]:
    opts: dict[str, Any] = {"encoding": "utf-8", "errors": "surrogateescape", "newline": ""}
    if fmt in STREAMED:
        return open(path, "a" if append else "w", **opts)
    return atomic_open(path, "w", **opts)


def _output_error(path: str | None, exc: OSError) -> OutputError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputError(path, "no space left on the device (records written before it are kept in jsonl "
                                 "output; free space and rerun with --resume)")
    if isinstance(exc, IsADirectoryError):
        return OutputError(path, "is a directory; give a file name")
    return OutputError(path, f"cannot write: {exc.strerror or exc}")

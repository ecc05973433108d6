"""Measured ``auto`` for inference: which engine, precision and (torch) memory format serve a
checkpoint fastest on this machine, and at which batch size, decided by timing the candidates on the
actual model and input size, once, then cached per machine (:mod:`hierarchy.core.tunecache`).

Candidates are every engine whose needs are met (:func:`hierarchy.engine.backends.unmet_need`) x every
precision it serves here (bf16 on CPU only with native bf16, fp16 on CPU only with AVX512-FP16/AMX-FP16,
int8 only where :func:`hierarchy.engine.quantize.int8_problem` passes for that engine) x, for torch, channels_last vs
contiguous. Each is loaded and run on a random uint8 batch: one warm-up, then timed batches for about
:data:`BUDGET_S`; one already far slower than the best so far is stopped early. The winner is swept
over :data:`BATCH_SIZES`. Each candidate's start-up (load, plus the warm-up batch's extra time; an
engine's first candidate also pays its runtime's import) is recorded too: a run that says how many
inputs it has (``hierarchy run`` counts up to 4,096) gets the candidate that finishes it first,
:meth:`TuneResult.for_inputs`. Explicit ``--engine`` and ``--precision`` together skip all of this;
``HIERARCHY_TUNE=off`` uses the conservative rule (:func:`hierarchy.engine.backends.choose_engine`,
fp32 on CPUs without AMX). See docs/tuning.md.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hierarchy.core import machine
from hierarchy.core.errors import EngineError
from hierarchy.core.tunecache import cpu_default_precision, read_cache, tune_mode, write_cache
from hierarchy.engine import backends
from hierarchy.engine.backends import AUTO, choose_engine, unmet_need

if TYPE_CHECKING:
    from hierarchy.engine.backends import EngineSpec
    from hierarchy.engine.backends.base import Backend, Checkpoint

log = logging.getLogger("hierarchy.engine")

COMPARE_BATCH = 16  # the batch every candidate is compared at
BATCH_SIZES = (8, 16, 32, 64)  # swept for the winner
DEFAULT_BATCH = 32  # `--batch-size` when nothing was measured
BUDGET_S = 0.4  # timed seconds per candidate (at least one batch)
MAX_RUNS = 20
EARLY_STOP = 0.5  # stop a candidate whose first timed batches run below this share of the best so far
WARM_STOP = 0.25  # ... or whose warm-up batch already did
BATCH_TOLERANCE = 0.97  # the smallest batch within 3% of the fastest wins (less latency and memory)
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
FP16_FLAGS = frozenset({"avx512_fp16", "amx_fp16"})
NO_FORMAT = "-"


@dataclass(frozen=True)
class Candidate:
    engine: str
    precision: str
    memory_format: str = NO_FORMAT  # torch: channels_last | contiguous

    def label(self) -> str:
        fmt = "" if self.memory_format == NO_FORMAT else f" {self.memory_format}"
        return f"{self.engine} {self.precision}{fmt}"


@dataclass
class Measurement:
    candidate: Candidate
    batch: int
    img_s: float  # 0 when it failed or was not served as asked
    note: str = ""  # stopped early, failed, ...
    # load + warm-up batch - one steady batch: what a run pays before full speed (an engine's first
    # candidate also pays its runtime's import, when this process had not imported it yet)
    start_s: float = 0.0


@dataclass
class TuneResult:
    pick: Candidate
    batch: int
    measurements: list[Measurement]
    batches: dict[int, float] = field(default_factory=dict)  # the winner's img/s per batch size
    workers: int = 1  # decode threads (hierarchy.data.batches.default_workers: the cores, recorded)
    measured_at: str = ""
    cache: str = ""
    from_cache: bool = False
    reason: str = ""  # why the pick is not the fastest (a short run, see for_inputs)

    @property
    def best_img_s(self) -> float:
        return max(m.img_s for m in self.measurements if m.candidate == self.pick)

    def runner_up(self) -> Measurement | None:
        others = [m for m in self.measurements if m.candidate != self.pick and m.img_s > 0]
        return max(others, key=lambda m: m.img_s) if others else None

    def start_s(self, engine: str) -> float:
        """What a run on ``engine`` pays before its first batch at full speed (its costliest start measured)."""
        return max((m.start_s for m in self.measurements if m.candidate.engine == engine), default=0.0)

    def for_inputs(self, n: int | None) -> "TuneResult":
        """This tuning for a run of ``n`` inputs: the candidate that finishes first counting its engine's
        start-up, ``start + n / rate`` (a one-image run should not import torch to win 5% of throughput).
        ``None`` (a long or unknown run): unchanged, the fastest."""
        timed = [m for m in self.measurements if m.img_s > 0]
        if n is None or not timed:
            return self
        first = min(timed, key=lambda m: self.start_s(m.candidate.engine) + n / m.img_s)
        if first.candidate == self.pick:
            return self
        why = (f"a run of {n} input(s) finishes first on it: start {self.start_s(first.candidate.engine):.2f} s "
               f"vs {self.start_s(self.pick.engine):.2f} s for the fastest, {self.pick.label()}")
        return replace(self, pick=first.candidate, batch=min(COMPARE_BATCH, max(1, n)), batches={}, reason=why)

    def summary(self, name: str) -> str:
        """The log line: what was picked and from which measurement."""
        other = self.runner_up()
        versus = f" vs {other.candidate.label()} {other.img_s:.0f} img/s" if other else ""
        where = "cached, measured" if self.from_cache else "measured"
        reason = f"; {self.reason}" if self.reason else ""
        return (f"tune: {name} -> {self.pick.label()} batch {self.batch} ({where} {self.measured_at}, "
                f"{self.best_img_s:.0f} img/s{versus}{reason}; cache {display_path(self.cache)})")

    def to_dict(self) -> dict[str, Any]:
        return {"pick": asdict(self.pick), "batch": self.batch, "workers": self.workers,
                "batches": {str(k): v for k, v in self.batches.items()},
                "measurements": [{**asdict(m.candidate), "batch": m.batch, "img_s": m.img_s, "note": m.note,
                                  "start_s": m.start_s} for m in self.measurements]}

    @classmethod
    def from_record(cls, record: dict[str, Any], from_cache: bool) -> "TuneResult":
        r = record["result"]
        rows = [Measurement(Candidate(m["engine"], m["precision"], m["memory_format"]), int(m["batch"]),
                            float(m["img_s"]), m.get("note", ""), float(m["start_s"])) for m in r["measurements"]]
        pick = Candidate(**r["pick"])
        if not any(m.candidate == pick and m.img_s > 0 for m in rows):
            raise ValueError("the pick has no measurement")
        return cls(pick, int(r["batch"]), rows, {int(k): float(v) for k, v in r["batches"].items()},
                   int(r.get("workers", 1)), record["measured_at"], record["path"], from_cache)


# ---------------------------------------------------------------- what is tried


def candidates(ckpt: "Checkpoint", device: str = AUTO, engine: str = AUTO, precision: str = AUTO) -> list[Candidate]:
    """What can serve ``ckpt`` here, honouring an explicit ``engine`` or ``precision``; likely
    fastest first (:data:`AUTO_ORDER`, then torch), so that slow ones are stopped early."""
    names = [engine] if engine != AUTO else [*backends.AUTO_ORDER, *(n for n in backends.ENGINES
                                                                      if n not in backends.AUTO_ORDER)]
    out = []
    for name in names:
        spec = backends.ENGINES.get(name) if engine == AUTO else backends.get_engine(name)
        if spec is None or unmet_need(spec, ckpt, device, precision):
            continue
        formats = ("channels_last", "contiguous") if name == "torch" else (NO_FORMAT,)
        out += [Candidate(name, p, f) for p in served_precisions(spec, ckpt, device, precision) for f in formats]
    return out


def served_precisions(spec: "EngineSpec", ckpt: "Checkpoint", device: str, requested: str) -> list[str]:
    """The precisions of ``spec`` worth timing here (all of them, or just ``requested``)."""
    wanted = sorted(spec.precisions if requested == AUTO else [requested], key=lambda p: p != "int8")
    if "int8" in wanted and not int8_ready(ckpt, spec.name):
        wanted.remove("int8")
    if not on_cpu(spec, device):
        return wanted
    flags = machine.cpu_flags()
    return [p for p in wanted if not (p == "bf16" and not flags & BF16_FLAGS)
            and not (p == "fp16" and (spec.name == "torch" or not flags & FP16_FLAGS))]


def int8_ready(ckpt: "Checkpoint", engine: str) -> bool:
    """Whether the checkpoint has an INT8 model that passed its agreement guard on ``engine`` (its file is hashed
    only if it is loaded: a replaced one then fails to load and is not picked)."""
    try:
        from hierarchy.engine.quantize import int8_problem
    except ImportError:
        return False
    return int8_problem(ckpt, engine, hash_file=False) is None


def on_cpu(spec: "EngineSpec", device: str) -> bool:
    """Whether ``spec`` will compute on the CPU for ``--device device`` (a cheap guess for auto: no
    NVIDIA driver nodes and not macOS, where MPS may be used)."""
    if device != AUTO:
        return device.partition(":")[0] == "cpu"
    accelerator = os.path.exists("/dev/nvidiactl") or sys.platform == "darwin"
    return tuple(spec.devices) == ("cpu",) or not accelerator


# ---------------------------------------------------------------- measuring


def load_candidate(ckpt: "Checkpoint", device: str, cand: Candidate) -> "Backend":
    backend = backends.ENGINES[cand.engine].load(ckpt, device, cand.precision)
    if cand.memory_format == "contiguous":
        _to_contiguous(backend)
    return backend


def _to_contiguous(backend: Any) -> None:
    """The torch backend in NCHW (it prepares channels_last): its model and the inputs it makes."""
    import dataclasses

    import torch

    backend.plan = dataclasses.replace(backend.plan, memory_format=torch.contiguous_format)
    backend.model = backend.model.to(memory_format=torch.contiguous_format)


def random_batch(n: int, size: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(n, 3, size, size), dtype=np.uint8)


def time_backend(backend: "Backend", x: np.ndarray, beat: float = 0.0) -> tuple[float, str, float]:
    """img/s of ``backend`` on ``x`` after one warm-up, the note and the warm-up's seconds; stopped
    early (and said so) when it runs far below ``beat``, the best rate so far."""
    t0 = time.perf_counter()
    backend.run(x)
    warm_s = max(time.perf_counter() - t0, 1e-9)
    warm = len(x) / warm_s
    if beat and warm < beat * WARM_STOP:
        return warm, "stopped after warm-up", warm_s
    runs, elapsed = 0, 0.0
    while True:
        t0 = time.perf_counter()
        backend.run(x)
        elapsed, runs = elapsed + time.perf_counter() - t0, runs + 1
        rate = runs * len(x) / max(elapsed, 1e-9)
        if beat and rate < beat * EARLY_STOP:
            return rate, "stopped early", warm_s
        if elapsed >= BUDGET_S or runs >= MAX_RUNS:
            return rate, "", warm_s


def measure(ckpt: "Checkpoint", device: str, cands: list[Candidate]) -> tuple[list[Measurement], Any]:
    """Every candidate timed at :data:`COMPARE_BATCH`; returns the rows and the fastest loaded backend."""
    x = random_batch(COMPARE_BATCH, ckpt.preset.size)
    rows, best, best_backend = [], 0.0, None
    for cand in cands:
        try:
            t0 = time.perf_counter()
            backend = load_candidate(ckpt, device, cand)
            load_s = time.perf_counter() - t0
            if backend.precision != cand.precision:
                rows.append(Measurement(cand, len(x), 0.0, f"served as {backend.precision}"))
                continue
            rate, note, warm_s = time_backend(backend, x, best)
        except Exception as exc:  # noqa: BLE001 - a candidate that cannot run is not picked, the rest go on
            log.warning("tune: %s failed (%s: %s); not a candidate", cand.label(), type(exc).__name__, exc)
            rows.append(Measurement(cand, len(x), 0.0, f"failed: {type(exc).__name__}"))
            continue
        rows.append(Measurement(cand, len(x), rate, note, load_s + max(0.0, warm_s - len(x) / rate)))
        if rate > best:
            best, best_backend = rate, backend
    return rows, best_backend


def sweep_batches(backend: "Backend", size: int, known: dict[int, float]) -> dict[int, float]:
    """img/s per batch size, smallest first; stops growing once a size is clearly slower."""
    rates = dict(known)
    for n in sorted(BATCH_SIZES):
        if n not in rates:
            rates[n] = time_backend(backend, random_batch(n, size))[0]
        if n > min(BATCH_SIZES) and rates[n] < 0.95 * max(rates.values()):
            break
    return dict(sorted(rates.items()))


def pick_batch(rates: dict[int, float]) -> int:
    best = max(rates.values())
    return min(n for n, r in rates.items() if r >= BATCH_TOLERANCE * best)


# ---------------------------------------------------------------- the entry points


def key_parts(ckpt: "Checkpoint", device: str, cands: list[Candidate]) -> dict[str, Any]:
    """What a measurement depends on besides the machine: model (arch, weights and export hashes),
    input size, device, the compared batch and which candidates there were."""
    from hierarchy.engine.exported import export_entries, export_key, onnx_path_for

    entry = export_entries(ckpt.meta).get(export_key(onnx_path_for(ckpt.weights), ckpt.run_dir)) or {}
    model = {"arch": ckpt.meta.arch, "weights_sha256": ckpt.weights_sha256, "export_sha256": entry.get("sha256")}
    return {"kind": "infer", "model": model, "size": ckpt.preset.size, "device": device, "batch": COMPARE_BATCH,
            "candidates": [c.label() for c in cands]}


def tune_checkpoint(ckpt: "Checkpoint", device: str = AUTO, cands: list[Candidate] | None = None,
                    refresh: bool = False, inputs: int | None = None) -> tuple[TuneResult, Any]:
    """The tuning of ``ckpt`` (from the cache unless ``refresh``) and its winner, loaded; from the
    cache, the winner for a run of ``inputs`` images (:meth:`TuneResult.for_inputs`). A fresh
    measurement has imported and loaded every engine already, so the fastest is the winner then."""
    cands = candidates(ckpt, device) if cands is None else cands
    if not cands:
        raise EngineError(f"{ckpt.meta_path}: no engine can run this checkpoint on device {device}")
    parts = key_parts(ckpt, device, cands)
    result = None if refresh else cached_result(parts)
    if result is not None:
        result = result.for_inputs(inputs)
        return result, load_candidate(ckpt, device, result.pick)
    rows, backend = measure(ckpt, device, cands)
    if backend is None:
        raise EngineError(f"{ckpt.meta_path}: every engine failed while tuning: "
                          + "; ".join(f"{m.candidate.label()} {m.note}" for m in rows))
    pick = max((m for m in rows if m.img_s > 0), key=lambda m: m.img_s)
    rates = sweep_batches(backend, ckpt.preset.size, {COMPARE_BATCH: pick.img_s})
    from hierarchy.data.batches import default_workers

    result = TuneResult(pick.candidate, pick_batch(rates), rows, rates, default_workers())
    record = write_cache(parts, result.to_dict())
    result.measured_at, result.cache = record["measured_at"], record["path"]
    return result, backend


def cached_result(parts: dict[str, Any]) -> TuneResult | None:
    """The cached tuning for ``parts``; a record whose result does not parse is warned about and ignored."""
    record = read_cache(parts)
    if record is None:
        return None
    try:
        return TuneResult.from_record(record, from_cache=True)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        log.warning("tune cache %s has a malformed result (%s: %s); measuring again", record["path"],
                    type(exc).__name__, exc)
        return None


def load_backend(ckpt: "Checkpoint", device: str = AUTO, precision: str = AUTO, engine: str = AUTO,
                 name: str = "stage", inputs: int | None = None) -> tuple["Backend", str, TuneResult | None]:
    """The backend ``load_predictor`` uses, why, and the tuning it came from (None: not measured,
    because engine and precision were both given, only one candidate exists, or HIERARCHY_TUNE=off).
    ``inputs``: how many images the caller will run, when it is known to be few (None: many or unknown)."""
    mode = tune_mode()
    if mode != "off" and AUTO in (engine, precision):
        cands = candidates(ckpt, device, engine, precision)
        if len(cands) > 1:
            result, backend = tune_checkpoint(ckpt, device, cands, refresh=mode == "refresh", inputs=inputs)
            log.info("%s", result.summary(name))
            why = "tuned: first to finish this short run here" if result.reason else "tuned: measured fastest here"
            return backend, why, result
    spec, why = choose_engine(engine, ckpt, device, precision)
    return spec.load(ckpt, device, conservative_precision(spec, device, precision)), why, None


def conservative_precision(spec: "EngineSpec", device: str, precision: str) -> str:
    """``auto`` made explicit where the rule differs from an engine's own auto: fp32 on a CPU without
    AMX (an engine would pick bf16 from the AVX512-BF16 flag alone)."""
    if precision == AUTO and on_cpu(spec, device) and cpu_default_precision() == "fp32" and "fp32" in spec.precisions:
        return "fp32"
    return precision


def router_batch_size(router: Any, requested: int | None) -> int:
    """``--batch-size`` when given, else what the root stage's tuning picked, else :data:`DEFAULT_BATCH`."""
    if requested:
        return requested
    tuned = getattr(router.stages[router.pipeline.root].predictor, "tuned", None)
    return tuned.batch if tuned is not None else DEFAULT_BATCH


def checkpoints_of(target: str | os.PathLike) -> list[tuple[str, "Checkpoint"]]:
    """(name, checkpoint) for a run directory (or its weights / metadata.json), or for every stage with
    weights of a pipeline YAML or bundle, each checkpoint once."""
    from hierarchy.engine.backends.base import Checkpoint
    from hierarchy.engine.bundle import is_bundle
    from hierarchy.engine.export import PIPELINE_SUFFIXES

    path = Path(target)
    if not (path.suffix in PIPELINE_SUFFIXES or (path.is_file() and is_bundle(path))):
        ckpt = Checkpoint.open(path)
        return [(ckpt.meta.stage, ckpt)]
    from hierarchy.engine.pipeline import load_pipeline

    pipe, out, seen = load_pipeline(path), [], set()
    for sid in pipe.depth_order():
        weights = pipe.weights_path(sid)
        ckpt = Checkpoint.open(weights) if weights is not None else None
        if ckpt is not None and ckpt.weights.resolve() not in seen:
            seen.add(ckpt.weights.resolve())
            out.append((sid, ckpt))
    return out


def display_path(path: str) -> str:
    """``path`` with the home directory as ``~``."""
    home = str(Path.home())
    return "~" + path[len(home):] if path.startswith(home + os.sep) else path

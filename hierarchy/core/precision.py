"""The one list of numeric precisions a user can ask for (training and every inference engine).

``int8`` is an inference precision only: the quantised export of ``hierarchy export --int8``, run by
an exported engine (onnx, openvino). Training computes in :data:`TRAIN_PRECISIONS`."""
from __future__ import annotations

from typing import Literal, get_args

Precision = Literal["auto", "fp32", "bf16", "fp16", "int8"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
TrainPrecision = Literal["auto", "fp32", "bf16", "fp16"]
TRAIN_PRECISIONS: tuple[str, ...] = get_args(TrainPrecision)
INFERENCE_ONLY = tuple(p for p in PRECISIONS if p not in TRAIN_PRECISIONS)  # ("int8",)


def check_precision(requested: str, where: str = "--precision") -> str:
    """``requested`` if it is a known precision, else a :class:`ConfigError` naming ``where``."""
    if requested not in PRECISIONS:
        from hierarchy.core.errors import ConfigError

        raise ConfigError("command line", [f"{where}: unknown precision {requested!r}; use one of "
                                           f"{', '.join(PRECISIONS)}"])
    return requested

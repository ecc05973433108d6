"""The one list of numeric precisions a user can ask for (training and every inference engine)."""
from __future__ import annotations

from typing import Literal, get_args

Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)


def check_precision(requested: str, where: str = "--precision") -> str:
    """``requested`` if it is a known precision, else a :class:`ConfigError` naming ``where``."""
    if requested not in PRECISIONS:
        from hierarchy.core.errors import ConfigError

        raise ConfigError("command line", [f"{where}: unknown precision {requested!r}; use one of "
                                           f"{', '.join(PRECISIONS)}"])
    return requested

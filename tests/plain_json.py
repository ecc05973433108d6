"""``assert_plain_json``: a result holds only builtin JSON types, checked by exact type.

``json.dumps`` alone proves little: ``np.float64`` subclasses ``float`` and serialises without
complaint, so a numpy scalar leaking into a report would pass it.
"""
from __future__ import annotations

import math
from typing import Any

_SCALARS = (int, float, str, bool, type(None))


def assert_plain_json(obj: Any, where: str = "result") -> None:
    """Every value is exactly a builtin int/float/str/bool/None, list or dict with str keys; floats are finite."""
    kind = type(obj)
    if kind is dict:
        for key, value in obj.items():
            assert type(key) is str, f"{where}: key {key!r} is a {type(key).__name__}, not str"
            assert_plain_json(value, f"{where}[{key!r}]")
    elif kind is list:
        for i, value in enumerate(obj):
            assert_plain_json(value, f"{where}[{i}]")
    else:
        assert kind in _SCALARS, f"{where} is a {kind.__module__}.{kind.__name__}, not a builtin JSON type"
        assert kind is not float or math.isfinite(obj), f"{where} is {obj}, not valid JSON"

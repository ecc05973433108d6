"""The runtimes' compiled forms of a verified export, cached signed in the user cache dir
(hierarchy.engine.backends.compiled_cache): ONNX Runtime's optimised graph and OpenVINO's compiled
model. Reused when signed for the same export, never when tampered with or unverified."""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest

from hierarchy.core import statcache


def tiny_model(scale: float = 1.0) -> tuple[bytes, str]:
    """A one-MatMul ONNX model (x (N, 4) -> y (N, 3)) and its SHA-256."""
    pytest.importorskip("onnx")
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3) * np.float32(scale), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "tiny",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])], [w])
    data = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    return data, hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- ONNX Runtime's optimised graph


def session_of(model: bytes, sha: str | None):
    ort = pytest.importorskip("onnxruntime")

    from hierarchy.engine.backends.onnx_backend import make_session

    return make_session(ort, model, ["CPUExecutionProvider"], Path("tiny.onnx"), sha)


def test_the_optimised_graph_is_cached_and_reused(user_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    from hierarchy.engine.backends import onnx_cache

    model, sha = tiny_model()
    x = np.ones((2, 4), np.float32)
    want = session_of(model, sha).run(None, {"x": x})[0]
    assert len(list((user_cache / onnx_cache.SUBDIR).glob("*.onnx"))) == 1
    saved: list[str] = []
    monkeypatch.setattr(onnx_cache, "save_optimized", lambda *a: saved.append("again") or pytest.fail("re-optimised"))
    np.testing.assert_array_equal(session_of(model, sha).run(None, {"x": x})[0], want)
    assert saved == []


@pytest.mark.parametrize("tamper", ["graph", "record"])
def test_a_tampered_optimised_graph_is_not_used(user_cache: Path, tamper: str, caplog: pytest.LogCaptureFixture) -> None:
    import numpy as np

    from hierarchy.engine.backends import onnx_cache

    model, sha = tiny_model()
    x = np.ones((1, 4), np.float32)
    want = session_of(model, sha).run(None, {"x": x})[0]
    graph = next((user_cache / onnx_cache.SUBDIR).glob("*.onnx"))
    if tamper == "graph":  # another model with the same signature, put in its place
        graph.write_bytes(tiny_model(scale=2.0)[0])
    else:
        record = graph.with_suffix(".json")
        record.write_text(json.dumps({**json.loads(record.read_text()), "mac": "0" * 64}))
    with caplog.at_level(logging.WARNING, logger="hierarchy.engine.backends.compiled_cache"):
        got = session_of(model, sha).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, want)
    assert "not signed for this export" in caplog.text


def test_no_cache_without_a_verified_hash(user_cache: Path) -> None:
    from hierarchy.engine.backends import onnx_cache

    model, _ = tiny_model()
    session_of(model, None)
    assert not (user_cache / onnx_cache.SUBDIR).exists()


# ---------------------------------------------------------------- OpenVINO's compiled model


def compiled_of(model: bytes, sha: str, precision: str = "fp32"):
    ov = pytest.importorskip("openvino")

    from hierarchy.engine.backends.openvino_backend import cached_compile

    return cached_compile(ov.Core(), model, precision, Path("tiny.onnx"), sha)


def infer(compiled, x):
    return compiled.create_infer_request().infer([x])[compiled.output(0)]


def test_the_openvino_compiled_model_is_cached_and_imported(user_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    from hierarchy.engine.backends import openvino_backend

    model, sha = tiny_model()
    x = np.ones((2, 4), np.float32)
    want = infer(compiled_of(model, sha), x)
    np.testing.assert_allclose(want, x @ np.arange(12, dtype=np.float32).reshape(4, 3))
    assert len(list((user_cache / openvino_backend.SUBDIR).glob("*.blob"))) == 1
    monkeypatch.setattr(openvino_backend, "compile_model", lambda *a: pytest.fail("compiled again"))
    imported = compiled_of(model, sha)
    np.testing.assert_array_equal(infer(imported, x), want)
    # the precision is the one asked for, not the CPU plugin's default (bf16 where the CPU has it)
    assert str(imported.get_property("INFERENCE_PRECISION_HINT")) == "<Type: 'float32'>"


def test_the_openvino_cache_is_keyed_by_precision_and_export(user_cache: Path) -> None:
    import numpy as np

    from hierarchy.engine.backends import openvino_backend

    model, sha = tiny_model()
    other, other_sha = tiny_model(scale=3.0)
    x = np.ones((1, 4), np.float32)
    compiled_of(model, sha, "fp32")
    compiled_of(model, sha, "bf16")
    got = infer(compiled_of(other, other_sha), x)  # never the first export's blob
    np.testing.assert_allclose(got, 3 * (x @ np.arange(12, dtype=np.float32).reshape(4, 3)))
    assert len(list((user_cache / openvino_backend.SUBDIR).glob("*.blob"))) == 3


@pytest.mark.parametrize("tamper", ["blob", "record", "garbage"])
def test_a_tampered_openvino_blob_is_not_used(user_cache: Path, tamper: str, caplog: pytest.LogCaptureFixture) -> None:
    import numpy as np

    from hierarchy.engine.backends import openvino_backend

    model, sha = tiny_model()
    x = np.ones((1, 4), np.float32)
    want = infer(compiled_of(model, sha), x)
    blob = next((user_cache / openvino_backend.SUBDIR).glob("*.blob"))
    record = blob.with_suffix(".json")
    if tamper == "blob":  # another model's compiled blob, put in its place
        other, other_sha = tiny_model(scale=2.0)
        compiled_of(other, other_sha)
        blob.write_bytes(next(p for p in blob.parent.glob("*.blob") if p != blob).read_bytes())
    elif tamper == "record":
        record.write_text(json.dumps({**json.loads(record.read_text()), "mac": "0" * 64}))
    else:
        record.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="hierarchy.engine.backends.compiled_cache"):
        got = infer(compiled_of(model, sha), x)
    np.testing.assert_array_equal(got, want)
    assert f"ignoring the cached {openvino_backend.SUBDIR} file" in caplog.text


def test_no_openvino_cache_with_the_stat_cache_off(user_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hierarchy.engine.backends import openvino_backend

    monkeypatch.setenv(statcache.ENV, "off")
    model, sha = tiny_model()
    compiled_of(model, sha)
    assert not (user_cache / openvino_backend.SUBDIR).exists()

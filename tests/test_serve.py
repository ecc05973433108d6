"""``hierarchy serve`` through FastAPI's TestClient: records, typed errors, limits, readiness, metrics,
API key, pipeline info, explanations and the page. The model is the hand-built marker of
tests/test_explain.py: 'marked' exactly when a bright square is in the image."""
from __future__ import annotations

import hashlib
import io
import json
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from hierarchy.serve.app import create_app  # noqa: E402
from hierarchy.serve.limits import Limits  # noqa: E402
from hierarchy.serve.service import ServeOptions, Service  # noqa: E402
from test_explain import PATCH, SIZE, mark_stage, marked, write_marker_run, write_pipeline  # noqa: E402,F401

OPTIONS = ServeOptions(device="cpu", precision="fp32", engine="torch", batch_size=8, workers=2)


def png_bytes(corner: tuple[int, int] | None, seed: int = 0, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(marked(np.random.default_rng(seed), corner).transpose(1, 2, 0)).save(buf, fmt, quality=95)
    return buf.getvalue()


@pytest.fixture(scope="module")
def marker_pipeline(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("serve")
    return write_pipeline(folder, write_marker_run(folder / "run"))


def make_client(pipeline: Path, limits: Limits | None = None, api_key: str | None = None,
                load: bool = True) -> tuple[TestClient, Service]:
    service = Service(pipeline, OPTIONS, limits or Limits(max_upload_mb=0.05, max_files=6))
    if load:
        service.load()
    return TestClient(create_app(service, api_key=api_key, load_on_startup=False)), service


@pytest.fixture
def client(marker_pipeline: Path, mark_stage):
    tc, service = make_client(marker_pipeline)
    with tc:
        yield tc, service


def mixed_upload() -> list[tuple[str, tuple[str, bytes, str]]]:
    jpeg = png_bytes((0, 0), 1, "JPEG")
    files = {"good.jpg": jpeg, "plain.png": png_bytes(None, 2), "cut.jpg": jpeg[: len(jpeg) // 2],
             "paper.jpg": b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n",
             "huge.png": png_bytes(None, 3)[:8] + bytes(60_000)}
    return [("files", (name, data, "application/octet-stream")) for name, data in files.items()]


def test_mixed_upload_gives_one_record_per_file_in_order(client, tmp_path: Path, marker_pipeline: Path) -> None:
    tc, _ = client
    upload = mixed_upload()
    response = tc.post("/v1/classify", files=upload)
    assert response.status_code == 200
    records = response.json()
    assert [r["path"] for r in records] == [name for _, (name, _, _) in upload]
    assert [r["status"] for r in records] == ["ok", "ok", "error", "error", "error"]
    assert [r["label"] for r in records[:2]] == ["marked", "plain"]
    assert [r["error"]["type"] for r in records[2:]] == ["truncated", "unsupported_format", "too_large"]
    assert "PDF" in records[3]["error"]["message"] and "--max-upload-mb=0.05" in records[4]["error"]["message"]
    assert records[0]["trace"][0]["stage"] == "mark" and set(records[0]["trace"][0]["probs"]) == {"marked", "plain"}

    # the same records as `hierarchy run --format json` on the same files (the oversize one is fine on disk)
    from hierarchy.commands.cli import main

    for _, (name, data, _) in upload[:4]:
        (tmp_path / name).write_bytes(data)
    out = tmp_path / "run.json"
    main(["run", str(marker_pipeline), *(str(tmp_path / n) for _, (n, _, _) in upload[:4]), "--format", "json",
          "-o", str(out), "--device", "cpu", "--precision", "fp32", "--engine", "torch"])
    for served, ran in zip(records, json.loads(out.read_text())):
        assert Path(ran["path"]).name == served["path"] and ran["status"] == served["status"]
        if ran["status"] == "error":
            assert ran["error"]["type"] == served["error"]["type"]
        else:
            assert ran["label"] == served["label"] and ran["confidence"] == pytest.approx(served["confidence"], abs=1e-4)


def test_over_limit_requests_get_413(client) -> None:
    tc, _ = client
    many = [("files", (f"{i}.png", png_bytes(None, i), "image/png")) for i in range(7)]
    response = tc.post("/v1/classify", files=many)
    assert response.status_code == 413 and "--max-files=6" in response.json()["detail"]
    declared = tc.post("/v1/classify", content=b"x", headers={"content-length": str(10 ** 9),
                                                              "content-type": "multipart/form-data; boundary=b"})
    assert declared.status_code == 413 and "over the limit" in declared.json()["detail"]

    def chunks():  # no Content-Length: counted while streaming
        yield b"--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.png\"\r\n\r\n"
        for _ in range(40):
            yield bytes(16_384)
    streamed = tc.post("/v1/classify", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert streamed.status_code == 413


def test_ready_is_503_until_the_pipeline_is_loaded(marker_pipeline: Path, mark_stage) -> None:
    tc, service = make_client(marker_pipeline, load=False)
    with tc:
        assert tc.get("/health").json() == {"status": "alive"}
        ready = tc.get("/ready")
        assert ready.status_code == 503 and ready.json() == {"ready": False, "error": None}
        early = tc.post("/v1/classify", files=[("files", ("a.png", png_bytes(None), "image/png"))])
        assert early.status_code == 503 and "still loading" in early.json()["detail"]
        assert tc.get("/v1/pipeline").status_code == 503
        service.load()
        assert tc.get("/ready").json() == {"ready": True, "pipeline": "marks"}


def test_failed_load_shows_on_ready(tmp_path: Path, mark_stage) -> None:
    run = write_marker_run(tmp_path / "run")
    (run / "best.safetensors").write_bytes(b"\x80\x04 not weights at all")  # exists, fails to load
    tc, service = make_client(write_pipeline(tmp_path, run), load=False)
    with tc:
        with pytest.raises(Exception):
            service.load()
        body = tc.get("/ready").json()
        assert body["ready"] is False and "best.safetensors" in body["error"] and "pickle" in body["error"]


def metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if m and ",".join(sorted((m.group(1) or "").split(","))) == want:
            return float(m.group(2))
    return 0.0


def test_metrics_count_what_was_sent(client) -> None:
    tc, _ = client
    assert tc.post("/v1/classify", files=mixed_upload()).status_code == 200
    assert tc.post("/v1/classify", files=[("files", ("a.png", png_bytes((8, 8)), "image/png"))]).status_code == 200
    tc.post("/v1/classify", files=[("files", (f"{i}.png", b"x", "image/png")) for i in range(7)])  # 413
    text = tc.get("/metrics").text
    assert metric(text, "hierarchy_items_total", status="ok") == 3
    assert metric(text, "hierarchy_items_total", status="error") == 3
    assert metric(text, "hierarchy_item_errors_total", type="truncated") == 1
    assert metric(text, "hierarchy_http_requests_total", path="/v1/classify", code="200") == 2
    assert metric(text, "hierarchy_http_requests_total", path="/v1/classify", code="413") == 1
    assert metric(text, "hierarchy_classify_seconds_count") == 2
    assert metric(text, "hierarchy_batch_items_count") == 2 and metric(text, "hierarchy_batch_items_sum") == 6
    assert metric(text, "hierarchy_classify_in_flight") == 0


def test_busy_gets_503_with_retry_after_and_slow_gets_504(marker_pipeline: Path, mark_stage) -> None:
    tc, service = make_client(marker_pipeline, Limits(max_queue=1, timeout_s=30))
    release, entered = threading.Event(), threading.Event()
    route = service.batcher.route

    def slow(items):
        entered.set()
        release.wait(10)
        return route(items)
    service.batcher.route = slow
    one = [("files", ("a.png", png_bytes(None), "image/png"))]
    with tc:
        first: dict = {}
        thread = threading.Thread(target=lambda: first.update(r=tc.post("/v1/classify", files=one)))
        thread.start()
        assert entered.wait(10)
        busy = tc.post("/v1/classify", files=one)
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1" and "busy" in busy.json()["detail"]
        release.set()
        thread.join(10)
        assert first["r"].status_code == 200 and len(first["r"].json()) == 1
        assert metric(tc.get("/metrics").text, "hierarchy_busy_rejections_total") == 1

    tc, service = make_client(marker_pipeline, Limits(timeout_s=0.3))
    release.clear()
    route = service.batcher.route
    service.batcher.route = slow
    with tc:
        start = time.perf_counter()
        late = tc.post("/v1/classify", files=one)
        assert late.status_code == 504 and time.perf_counter() - start < 5
        release.set()


def test_explain_true_returns_a_map_per_visited_stage(client) -> None:
    tc, _ = client
    corner = (SIZE - PATCH, 0)
    records = tc.post("/v1/classify?explain=true", files=[("files", ("m.png", png_bytes(corner), "image/png")),
                                                          ("files", ("bad.png", b"nope", "image/png"))]).json()
    (exp,) = records[0]["explanations"]
    assert exp["stage"] == "mark" and exp["label"] == "marked" and exp["layer"] == "layer4"
    assert exp["peak"]["y"] > 0.5 and exp["peak"]["x"] < 0.5  # the bottom-left quadrant, where the square is
    assert exp["image"].startswith("data:image/png;base64,")
    assert "explanations" not in records[1]
    plain = tc.post("/v1/classify", files=[("files", ("m.png", png_bytes(corner), "image/png"))]).json()
    assert "explanations" not in plain[0]


def test_api_key_guards_the_api_but_not_the_probes(marker_pipeline: Path, mark_stage) -> None:
    tc, _ = make_client(marker_pipeline, api_key="s3cret")
    one = [("files", ("a.png", png_bytes(None), "image/png"))]
    with tc:
        assert tc.get("/health").status_code == 200 and tc.get("/ready").status_code == 200
        assert tc.get("/").status_code == 200
        for path in ("/v1/pipeline", "/metrics"):
            assert tc.get(path).status_code == 401
            assert tc.get(path, headers={"X-API-Key": "s3cret"}).status_code == 200
        assert tc.post("/v1/classify", files=one).status_code == 401
        assert tc.post("/v1/classify", files=one, headers={"X-API-Key": "wrong"}).status_code == 401
        assert tc.post("/v1/classify", files=one, headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_pipeline_info(client, marker_pipeline: Path) -> None:
    tc, _ = client
    info = tc.get("/v1/pipeline").json()
    (stage,) = info["stages"]
    weights = marker_pipeline.parent / "run" / "best.safetensors"
    assert info["name"] == "marks" and "not a diagnosis" in info["disclaimer"]
    assert stage["id"] == "mark" and stage["labels"] == ["marked", "plain"] and stage["engine"] == "torch"
    assert stage["ood"] == {"setting": "off", "threshold": None} and stage["threshold"] is None
    assert stage["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert stage["input_size"] == SIZE and info["versions"]["hierarchy"] and "fastapi" in info["versions"]


def test_page_static_files_and_openapi(client) -> None:
    tc, _ = client
    page = tc.get("/")
    assert page.status_code == 200 and "not a diagnosis" in page.text and "/static/app.js" in page.text
    assert tc.get("/static/app.js").status_code == 200 and tc.get("/static/style.css").status_code == 200
    assert tc.get("/docs").status_code == 200
    assert "/v1/classify" in tc.get("/openapi.json").json()["paths"]


def test_serve_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hierarchy.commands.cli import main
    from hierarchy.commands.serve import API_KEY_ENV, is_loopback, read_api_key
    from hierarchy.core.errors import ConfigError

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")
    (tmp_path / "key").write_text("  abc \n")
    assert read_api_key(str(tmp_path / "key")) == "abc"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        read_api_key(str(tmp_path / "empty"))
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert read_api_key(None) == "from-env"
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--help"])
    assert exc.value.code == 0
    assert main(["serve", str(tmp_path / "nope.yaml")]) == 2

"""`hierarchy run --ray`: the same records as the plain run, on a local Ray cluster (2 CPUs).
Skipped when ray[data] is not installed (pip install 'hierarchy-cascade[ray]')."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from fakes import COLOR_BRIGHT_PIPE as PIPE
from fakes import solid

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from hierarchy.commands.cli import main  # noqa: E402

TESTS = Path(__file__).resolve().parent


def register_fakes() -> None:
    """Runs in every Ray worker process: the fake stages are no installed entry point."""
    import fakes
    from hierarchy.registry import register_plugin

    register_plugin(fakes.FakePlugin(), name="fakes")


@pytest.fixture
def local_ray(fake_stages):
    env = {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "HIERARCHY_DISABLE_PLUGIN_AUTOLOAD": "1"}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": env, "worker_process_setup_hook": "test_ray_run.register_fakes"})
    yield
    ray.shutdown()


def test_ray_gives_the_plain_runs_records(local_ray, tmp_path, capsys):
    folder = tmp_path / "imgs"
    for i in range(495):
        solid(folder / f"{i:04d}.png", (i * 37 % 256, i * 91 % 256, i % 256), size=6)
    for i in range(5):  # 1% corrupt
        (folder / f"bad{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    pipe = tmp_path / "pipe.yaml"
    pipe.write_text(PIPE)
    assert main(["run", str(pipe), str(folder), "--format", "jsonl", "-o", str(tmp_path / "plain.jsonl")]) == 3
    assert main(["run", str(pipe), str(folder), "--format", "jsonl", "-o", str(tmp_path / "ray.jsonl"), "--ray"]) == 3
    plain = [json.loads(x) for x in (tmp_path / "plain.jsonl").read_text().splitlines()]
    on_ray = [json.loads(x) for x in (tmp_path / "ray.jsonl").read_text().splitlines()]
    assert len(on_ray) == 500
    assert [r["path"] for r in on_ray] == [r["path"] for r in plain]  # same order, none lost or doubled
    assert [(r["status"], r["label"]) for r in on_ray] == [(r["status"], r["label"]) for r in plain]
    errors = [r for r in on_ray if r["status"] == "error"]
    assert len(errors) == 5 and all(r["error"]["type"] in ("undecodable", "truncated") for r in errors)
    assert "500 item(s)" in capsys.readouterr().err

"""`hierarchy run / validate / --help` through the CLI entry point, with fake stages."""
from __future__ import annotations

import csv
import io
import json

import pytest
from fakes import COLOR_BRIGHT_PIPE as PIPE
from fakes import solid

from hierarchy.commands.cli import COMMANDS, main



@pytest.fixture
def setup(fake_stages, tmp_path):
    pipe = tmp_path / "pipe.yaml"
    pipe.write_text(PIPE)
    imgs = tmp_path / "imgs"
    paths = [solid(imgs / "a.png", (250, 5, 5)), solid(imgs / "b.png", (5, 250, 5)),
             solid(imgs / "sub" / "c.png", (128, 128, 128))]
    (imgs / "notes.txt").write_text("not an image")  # ignored by directory expansion
    return pipe, imgs, paths


def test_run_jsonl_records_in_order(setup, capsys):
    pipe, imgs, paths = setup
    assert main(["run", str(pipe), str(imgs), "--format", "jsonl"]) == 0
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["path"] for r in recs] == [str(p) for p in paths]
    assert [r["status"] for r in recs] == ["ok", "ok", "abstained"]


def test_run_mixed_inputs_and_errors_exit_3(setup, capsys, tmp_path):
    pipe, imgs, paths = setup
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"garbage")
    code = main(["run", str(pipe), str(paths[0]), str(imgs / "*.png"), str(bad), str(tmp_path / "missing.png"),
                 "--format", "json"])
    assert code == 3
    recs = json.loads(capsys.readouterr().out)
    assert len(recs) == 5  # a.png is named twice (file + glob): one record per input
    assert [r["status"] for r in recs] == ["ok", "ok", "ok", "error", "error"]
    assert recs[4]["error"]["type"] == "not_found"


def test_run_csv_to_file_is_written(setup, tmp_path, capsys):
    pipe, imgs, _ = setup
    out = tmp_path / "out" / "res.csv"
    out.parent.mkdir()  # a missing folder is an output fault (exit 4, tests/test_run_scale.py)
    assert main(["run", str(pipe), str(imgs), "--format", "csv", "-o", str(out)]) == 0
    assert capsys.readouterr().out == ""
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [r["status"] for r in rows] == ["ok", "ok", "abstained"]
    assert rows[0]["trace"].startswith("color:red(") and "bright:" in rows[0]["trace"]
    assert not [p for p in out.parent.iterdir() if p.name != "res.csv"]  # no temp files left


def test_run_table_output(setup, capsys):
    pipe, imgs, _ = setup
    assert main(["run", str(pipe), str(imgs)]) == 0
    out = capsys.readouterr()
    assert out.out.splitlines()[0].split()[:3] == ["path", "status", "label"]
    assert "abstained" in out.out and "3 item(s)" in out.err


def test_run_bad_pipeline_exit_2(fake_stages, tmp_path, capsys):
    pipe = tmp_path / "p.yaml"
    pipe.write_text(PIPE.replace("threshold", "treshold"))
    assert main(["run", str(pipe), str(tmp_path)]) == 2
    assert "stages.color.treshold: extra field not permitted" in capsys.readouterr().err


def test_validate_ok_and_error(fake_stages, tmp_path, capsys):
    pipe = tmp_path / "p.yaml"
    pipe.write_text(PIPE)
    assert main(["validate", str(pipe)]) == 0
    assert capsys.readouterr().out.startswith("ok")
    pipe.write_text(PIPE.replace("other: stop", "other: nowhere"))
    assert main(["validate", str(pipe)]) == 2
    assert "stages.color.routes.other: route target 'nowhere'" in capsys.readouterr().err


def test_every_command_has_help(capsys):
    with pytest.raises(SystemExit) as top:
        main(["--help"])
    assert top.value.code == 0
    listing = capsys.readouterr().out
    for cmd in ("run", "validate", "stages"):
        assert cmd in listing
    for cmd in COMMANDS:
        name = cmd.replace("_", "-")
        if name not in listing:
            continue
        with pytest.raises(SystemExit) as info:
            main([name, "--help"])
        assert info.value.code == 0
        assert "usage: hierarchy " + name in capsys.readouterr().out


def test_version(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("hierarchy 0.")


def test_help_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys; from hierarchy.commands.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"

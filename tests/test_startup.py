"""Cold start: the signed stat cache that spares re-hashing weights and exports on every start
(hierarchy.core.statcache), and the phase timings ``$HIERARCHY_PHASES`` logs (hierarchy.core.phases).
The torch-free onnx run path is checked in test_onnx_engine.py (test_run_engine_onnx_never_imports_torch)."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hierarchy.core import phases, statcache


@pytest.fixture
def hashes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every full hash statcache computes (of a file, or of bytes it read)."""
    calls: list[str] = []
    real_file, real_bytes = statcache.sha256_file, statcache.sha256_bytes

    def counted_file(path):
        calls.append(str(path))
        return real_file(path)

    def counted_bytes(data):
        calls.append("bytes")
        return real_bytes(data)

    monkeypatch.setattr(statcache, "sha256_file", counted_file)
    monkeypatch.setattr(statcache, "sha256_bytes", counted_bytes)
    return calls


def weights(tmp_path: Path, data: bytes = b"w" * 4096) -> Path:
    path = tmp_path / "best.safetensors"
    path.write_bytes(data)
    return path


def test_a_hit_skips_hashing(user_cache: Path, hashes: list[str], tmp_path: Path) -> None:
    path = weights(tmp_path)
    want = hashlib.sha256(path.read_bytes()).hexdigest()
    assert statcache.file_sha256(path) == want and len(hashes) == 1
    assert statcache.file_sha256(path) == want and len(hashes) == 1  # second call: from the cache
    assert statcache.read_bytes_sha256(path) == (path.read_bytes(), want) and len(hashes) == 1
    assert stat.S_IMODE(os.stat(statcache.key_path()).st_mode) == 0o600


def test_read_bytes_records_for_file_sha256(user_cache: Path, hashes: list[str], tmp_path: Path) -> None:
    path = weights(tmp_path)
    data, digest = statcache.read_bytes_sha256(path)
    assert hashes == ["bytes"] and digest == hashlib.sha256(data).hexdigest()
    assert statcache.file_sha256(path) == digest and hashes == ["bytes"]


@pytest.mark.parametrize("change", ["size", "mtime", "same size and mtime"])
def test_a_changed_file_is_hashed_again(user_cache: Path, hashes: list[str], tmp_path: Path, change: str) -> None:
    path = weights(tmp_path)
    statcache.file_sha256(path)
    old = os.stat(path)
    time.sleep(0.05)  # past the file system's clock tick (the fixture turned the racy window off)
    if change == "size":
        path.write_bytes(b"w" * 4097)
    elif change == "mtime":
        os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns + 1_000_000_000))
    else:  # rewritten in place with other bytes, then the mtime put back: only the ctime tells
        path.write_bytes(b"x" * 4096)
        os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))
    assert statcache.file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert len(hashes) == 2


def test_a_replaced_file_is_hashed_again(user_cache: Path, hashes: list[str], tmp_path: Path) -> None:
    path = weights(tmp_path)
    statcache.file_sha256(path)
    other = tmp_path / "other"
    other.write_bytes(b"x" * 4096)
    os.replace(other, path)  # a new inode
    assert statcache.file_sha256(path) == hashlib.sha256(b"x" * 4096).hexdigest() and len(hashes) == 2


def entries() -> dict:
    return json.loads(statcache.cache_path().read_text())["entries"]


def write_entries(e: dict) -> None:
    statcache.cache_path().write_text(json.dumps({"version": statcache.VERSION, "entries": e}))


@pytest.mark.parametrize("tamper", ["sha256", "mac", "size"])
def test_a_tampered_entry_is_ignored_with_a_warning(user_cache: Path, hashes: list[str], tmp_path: Path, tamper: str,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    path = weights(tmp_path)
    want = statcache.file_sha256(path)
    e = entries()
    entry = e[os.path.realpath(path)]
    entry[tamper] = "0" * 64 if tamper != "size" else entry["size"] + 1  # valid JSON, signature no longer fits
    write_entries(e)
    with caplog.at_level(logging.WARNING, logger="hierarchy.core.statcache"):
        assert statcache.file_sha256(path) == want
    assert len(hashes) == 2 and "signature does not match" in caplog.text
    assert statcache.file_sha256(path) == want and len(hashes) == 2  # re-recorded, trusted again


def test_an_entry_signed_with_another_key_is_ignored(user_cache: Path, hashes: list[str], tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    path = weights(tmp_path)
    statcache.file_sha256(path)
    statcache.key_path().unlink()  # the cache now comes from another user or machine
    fd = os.open(statcache.key_path(), os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, os.urandom(32))
    os.close(fd)
    with caplog.at_level(logging.WARNING, logger="hierarchy.core.statcache"):
        assert statcache.file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert len(hashes) == 2 and "signature does not match" in caplog.text


def test_a_key_file_others_can_read_is_not_trusted(user_cache: Path, hashes: list[str], tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    path = weights(tmp_path)
    statcache.file_sha256(path)
    os.chmod(statcache.key_path(), 0o644)
    with caplog.at_level(logging.WARNING, logger="hierarchy.core.statcache"):
        statcache.file_sha256(path)
    assert len(hashes) == 2 and "not a private key file" in caplog.text


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"version": 99, "entries": {}}'])
def test_a_corrupt_cache_file_is_ignored(user_cache: Path, hashes: list[str], tmp_path: Path, text: str,
                                         caplog: pytest.LogCaptureFixture) -> None:
    path = weights(tmp_path)
    statcache.file_sha256(path)
    statcache.cache_path().write_text(text)
    with caplog.at_level(logging.WARNING, logger="hierarchy.core.statcache"):
        assert statcache.file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert len(hashes) == 2 and "ignoring" in caplog.text
    assert statcache.file_sha256(path) and len(hashes) == 2  # rewritten


def test_an_unwritable_cache_dir_only_costs_the_hashing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        hashes: list[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("HIERARCHY_CACHE_DIR", str(blocker / "cache"))
    monkeypatch.setattr(statcache, "RACY_SECONDS", 0.0)
    path = weights(tmp_path)
    want = hashlib.sha256(path.read_bytes()).hexdigest()
    assert statcache.file_sha256(path) == want and statcache.read_bytes_sha256(path)[1] == want
    assert len(hashes) == 2


def test_a_freshly_written_file_is_not_recorded(user_cache: Path, hashes: list[str], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(statcache, "RACY_SECONDS", 60.0)
    path = weights(tmp_path)
    statcache.file_sha256(path)
    statcache.file_sha256(path)
    assert len(hashes) == 2 and not statcache.cache_path().exists()


def test_off_hashes_every_time(user_cache: Path, hashes: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(statcache.ENV, "off")
    path = weights(tmp_path)
    statcache.file_sha256(path)
    statcache.file_sha256(path)
    assert len(hashes) == 2


def test_phases_are_silent_unless_asked(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.delenv(phases.ENV, raising=False)
    with phases.phase("x"):
        pass
    assert phases.report() == [] and capsys.readouterr().err == ""


def test_phases_report_nested_timings(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv(phases.ENV, "1")
    for _ in range(2):
        with phases.phase("outer"):
            with phases.phase("inner"):
                pass
    lines = phases.report()
    assert [line.split(":")[0] for line in lines if "interpreter" not in line and "total" not in line] == \
        ["phase outer", "phase   inner"]
    assert capsys.readouterr().err.splitlines() == lines
    assert phases.report()[1:-1] == []  # cleared after reporting


def test_hierarchy_phases_env_logs_the_breakdown(tmp_path: Path) -> None:
    env = {**os.environ, phases.ENV: "1", "HIERARCHY_CACHE_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "hierarchy", "stages"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    names = [line.split(":")[0] for line in proc.stderr.splitlines() if line.startswith(phases.PREFIX)]
    assert names[0] == "phase interpreter start" and names[-1] == "phase process total"
    assert names[1:4] == ["phase import hierarchy.commands.cli", "phase parse arguments", "phase command stages"]


def test_a_command_start_imports_only_its_own_command_module() -> None:
    code = ("import sys; from hierarchy.commands.cli import build_parser; build_parser(sys.argv[1:]); "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('hierarchy.commands.'))))")
    only = subprocess.run([sys.executable, "-c", code, "-q", "run", "p.yaml"], capture_output=True, text=True, check=True)
    commands = {m for m in only.stdout.split() if not m.startswith("hierarchy.commands._")}  # helpers may load
    assert commands == {"hierarchy.commands.cli", "hierarchy.commands.run"}
    every = subprocess.run([sys.executable, "-c", code, "--help-me"], capture_output=True, text=True, check=True)
    assert "hierarchy.commands.train" in every.stdout.split()  # no command named: all of them, for the listing


# ---------------------------------------------------------------- exit without interpreter teardown

FAST_EXIT_SCRIPT = """
import atexit, pathlib, sys
import hierarchy.commands.cli as cli
out = pathlib.Path(sys.argv[1])

class Teardown:  # reached only when the interpreter frees its modules
    def __del__(self):
        (out / "teardown").write_text("freed")

keep = Teardown()

def command(argv=None):
    atexit.register(lambda: (out / "atexit").write_text("ran"))  # e.g. a bundle's extracted folder
    print("record", end="")  # buffered stdout: must still arrive
    return int(sys.argv[2])

cli.main = command
cli.entry()
"""


@pytest.mark.parametrize("fast", [True, False])
def test_the_cli_exit_keeps_code_output_and_atexit_handlers_but_skips_teardown(tmp_path: Path, fast: bool) -> None:
    env = {**os.environ, "HIERARCHY_FAST_EXIT": "on" if fast else "off"}
    done = subprocess.run([sys.executable, "-c", FAST_EXIT_SCRIPT, str(tmp_path), "3"], capture_output=True,
                          text=True, env=env, timeout=60)
    assert (done.returncode, done.stdout) == (3, "record")
    assert (tmp_path / "atexit").read_text() == "ran"
    assert (tmp_path / "teardown").exists() is not fast


def test_the_cli_exit_code_of_a_usage_error_is_kept(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "hierarchy", "run"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "usage:" in done.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [1, 2\n")
    done = subprocess.run([sys.executable, "-m", "hierarchy", "validate", str(bad)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and str(bad) in done.stderr

"""The extension loader: where sources and builds live, cache keys, CUDA settings, failures.

The CUDA compile check itself is a separate CI step (`python -m ioulab.detector.ops.build --cuda`,
minutes with nvcc), not a test.
"""
from __future__ import annotations

import importlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

build = importlib.import_module("ioulab.detector.ops.build")


def test_sources_found():
    src = build.source_dir()
    for name in build._CPU_SOURCES + build._CUDA_SOURCES + build._HEADERS:
        assert (src / name).is_file(), name


def test_build_hash_keys_on_cuda_flag_and_arch(monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    cpu, cuda = build.build_hash(False), build.build_hash(True)
    assert cpu == build.build_hash(False) and cpu != cuda
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    assert build.build_hash(True) != cuda
    assert build.build_hash(False) == cpu  # the arch list does not concern the CPU build


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("IOULAB_EXTENSIONS_DIR", str(tmp_path))
    assert build._cache_root() == tmp_path
    monkeypatch.delenv("IOULAB_EXTENSIONS_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert build._cache_root() == tmp_path / "xdg" / "ioulab" / "extensions"


@pytest.mark.skipif(not Path("/usr/local/cuda/bin/nvcc").exists(), reason="no CUDA toolkit")
def test_cuda_env_defaults(monkeypatch):
    cpp_extension = build._cpp_extension()
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", cpp_extension.CUDA_HOME)  # restored afterwards
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(build.torch.cuda, "is_available", lambda: False)
    build._prepare_cuda_env()
    assert os.environ["CUDA_HOME"] == "/usr/local/cuda"
    assert cpp_extension.CUDA_HOME == "/usr/local/cuda"
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == build._DEFAULT_CUDA_ARCH


def test_cuda_wanted_from_environment(monkeypatch):
    monkeypatch.setattr(build.torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("IOULAB_BUILD_CUDA", raising=False)
    assert not build.cuda_wanted()
    monkeypatch.setenv("IOULAB_BUILD_CUDA", "1")
    assert build.cuda_wanted()


def test_compile_failure_names_the_log(tmp_path):
    source = tmp_path / "broken.cpp"
    source.write_text('#error "deliberately broken"\n')
    with pytest.raises(build.ExtensionBuildError) as info:
        build.compile_and_load("ioulab_broken_test", [source], tmp_path / "build", with_cuda=False)
    log = tmp_path / "build" / "build.log"
    message = str(info.value)
    assert str(log) in message and "failed" in message
    assert "deliberately broken" in log.read_text()


def test_cli_exit_code(monkeypatch, capsys):
    def fail(**kwargs):
        raise build.ExtensionBuildError("compiler exploded; Full build log: /x/build.log")

    monkeypatch.setattr(build, "load_extension", fail)
    assert build.main(["--cuda"]) == 1
    assert "/x/build.log" in capsys.readouterr().err
    monkeypatch.setattr(build, "load_extension", lambda **kwargs: Path("/cache/abc"))
    assert build.main([]) == 0


# -- the cross-process build lock: a killed build never blocks the next one -------------------------
HOLD_LOCK = """
import pathlib, sys, time
from ioulab.detector.ops.build import build_lock
build_dir = pathlib.Path(sys.argv[1])
with build_lock(build_dir):
    (build_dir / "lock").write_text("")  # torch's loader lock file, as a build in progress leaves it
    print("locked", flush=True)
    time.sleep(600)
"""


def _hold_lock_in_child(build_dir: Path):
    """A process that holds the build lock (as a build in progress does) until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(build_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


class BatonLock:
    """The loader lock of torch versions before 2.14 (``FileBaton``): waits while the file exists,
    so a file left by a killed build blocks forever (here: 20 s, then fails the test)."""

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        deadline = time.monotonic() + 20
        while True:
            try:
                self.fd = os.open(self.path, os.O_CREAT | os.O_EXCL)
                return self
            except FileExistsError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"waited on the stale lock {self.path}") from None
                time.sleep(0.1)

    def __exit__(self, *exc):
        os.close(self.fd)
        os.remove(self.path)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("loader_lock", ["torch", "file_baton"])
def test_build_after_a_build_killed_halfway(tmp_path, monkeypatch, loader_lock):
    if loader_lock == "file_baton":
        monkeypatch.setattr(build._cpp_extension(), "FileLock", BatonLock)
    build_dir = tmp_path / "build"
    proc = _hold_lock_in_child(build_dir)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (build_dir / "lock").exists() and build.lock_owner(build_dir)["pid"] == proc.pid  # left behind
    source = tmp_path / "tiny_op.cpp"
    source.write_text("extern \"C\" int ioulab_lock_test() { return 1; }\n")
    t0 = time.monotonic()
    build.compile_and_load(f"ioulab_lock_test_{loader_lock}", [source], build_dir, with_cuda=False)
    assert time.monotonic() - t0 < 120
    assert f"ok: ioulab_lock_test_{loader_lock}" in (build_dir / "build.log").read_text()
    assert build.lock_owner(build_dir) is None  # released


@pytest.mark.timeout(60)
def test_a_held_lock_is_reported_with_the_fix_not_waited_on_forever(tmp_path):
    build_dir = tmp_path / "build"
    proc = _hold_lock_in_child(build_dir)
    try:
        t0 = time.monotonic()
        with pytest.raises(build.ExtensionBuildError) as info:
            with build.build_lock(build_dir, timeout=1.0):
                pass
        assert time.monotonic() - t0 < 10
    finally:
        proc.kill()
        proc.wait()
    message = str(info.value)
    assert "\n" not in message and f"pid {proc.pid}" in message
    assert f"delete {build_dir / 'ioulab.lock'}" in message


@pytest.mark.timeout(60)
def test_a_lock_held_for_a_dead_process_is_reported_within_seconds(tmp_path):
    build_dir = tmp_path / "build"
    proc = _hold_lock_in_child(build_dir)  # stands for a leaked lock whose recorded owner died
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (build_dir / "ioulab.lock.owner").write_text(f"{dead.pid} {socket.gethostname()} {time.time()}\n")
    try:
        t0 = time.monotonic()
        with pytest.raises(build.ExtensionBuildError, match=rf"recorded holder is dead \(pid {dead.pid} "):
            with build.build_lock(build_dir, timeout=600):
                pass
        assert time.monotonic() - t0 < 10
    finally:
        proc.kill()
        proc.wait()


def test_waiters_get_the_lock_in_turn(tmp_path):
    build_dir = tmp_path / "build"
    with build.build_lock(build_dir):
        assert build.lock_owner(build_dir)["pid"] == os.getpid()
    with build.build_lock(build_dir, timeout=1.0):  # released: no wait
        pass

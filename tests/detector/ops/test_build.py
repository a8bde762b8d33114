"""The extension loader: where sources and builds live, cache keys, CUDA settings, failures.

The CUDA compile check itself is a separate CI step (`python -m ioulab.detector.ops.build --cuda`,
minutes with nvcc), not a test.
"""
from __future__ import annotations

import importlib
import os
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

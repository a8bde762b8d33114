"""Build and load the C++/CUDA extension of ioulab's custom ops (PrRoIPool) on first use.

The extension is compiled with ``torch.utils.cpp_extension.load`` (ninja) into
``$IOULAB_EXTENSIONS_DIR`` or ``~/.cache/ioulab/extensions/<hash>``, where the hash covers the
sources, the torch version, the CUDA flag and the compile flags, so a changed source or a new
torch never picks up a stale binary. The build directory is guarded by the loader's file lock,
so several processes (e.g. Ray workers) may call :func:`load_extension` at once; within a
process a lock and a cache make it a one-time cost.

Build once per node, before any trial: ``python -m ioulab.detector.ops.build [--cuda]`` (every
recipe runs it). Across processes the build holds :func:`build_lock`, an OS lock (``flock``) on
``<build dir>/ioulab.lock`` that the kernel releases when its holder dies, so a build killed
halfway never blocks the next one; the holder's pid, host and start time are written next to it
(``ioulab.lock.owner``). Under that lock, a leftover ``lock`` file of torch's loader (which older
torch versions wait on forever while it exists) is removed. A waiter reports the holder after a few
seconds and gives up after ``IOULAB_BUILD_LOCK_TIMEOUT`` seconds (default 1800) with the path to
delete; a holder that is a dead process on this host is reported at once.

CUDA sources are compiled when ``torch.cuda.is_available()`` or ``IOULAB_BUILD_CUDA=1``.

Command line (the CI compile check of the CUDA kernels, works without a GPU)::

    python -m ioulab.detector.ops.build --cuda     # exits non-zero when the build fails
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import hashlib
import importlib.resources
import importlib.util
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path

import torch

from ioulab.detector.errors import UserError

_SOURCE_DIR_NAME = "prroi_pool"
_CPU_SOURCES = ("prroi_pool.cpp", "prroi_pool_cpu.cpp")
_CUDA_SOURCES = ("prroi_pool_cuda.cu",)
_HEADERS = ("prroi_pool.h", "prroi_pool_math.h", "prroi_pool_elements.h")
# -fopenmp: at::parallel_for is an inline `#pragma omp parallel` in the ATen headers; without
# the flag the extension's loops would silently run on one thread.
_CXX_FLAGS = ("-O3", "-fopenmp")
_LD_FLAGS = ("-fopenmp",)
_NVCC_FLAGS = ("-O3",)
_DEFAULT_CUDA_ARCH = "9.0"  # one architecture keeps the no-GPU compile check to a few minutes

_LOCK_NAME, _OWNER_NAME, _TORCH_LOCK_NAME = "ioulab.lock", "ioulab.lock.owner", "lock"
_LOCK_TIMEOUT = 1800.0  # seconds; a CUDA build takes minutes, a held lock beyond this is stuck
_REPORT_AFTER = 5.0  # seconds of waiting before the holder is named
_DEAD_GRACE = 2.0  # seconds a dead holder must stay recorded (a new holder writes itself at once)

_lock = threading.Lock()
_loaded: dict[bool, Path] = {}
_log = logging.getLogger(__name__)


class ExtensionBuildError(UserError, RuntimeError):
    """The extension failed to compile or load; the message names the build log."""


def source_dir() -> Path:
    """Folder with the PrRoIPool sources: the installed ``ioulab.csrc`` package, else the repo."""
    candidates: list[Path] = []
    try:
        candidates.append(Path(str(importlib.resources.files("ioulab.csrc"))))
    except (ModuleNotFoundError, NotADirectoryError, TypeError):
        # Editable installs make ioulab.csrc a namespace package whose path also holds the
        # editable finder's hook, which importlib.resources (3.11) rejects; read the path instead.
        spec = importlib.util.find_spec("ioulab.csrc")
        if spec is not None and spec.submodule_search_locations is not None:
            candidates += [Path(p) for p in spec.submodule_search_locations]
    candidates.append(Path(__file__).resolve().parents[2] / "csrc")
    for base in candidates:
        if (base / _SOURCE_DIR_NAME / _CPU_SOURCES[0]).is_file():
            return base / _SOURCE_DIR_NAME
    raise ExtensionBuildError(f"PrRoIPool sources not found; looked in {[str(c) for c in candidates]}")


def cuda_wanted() -> bool:
    return torch.cuda.is_available() or os.environ.get("IOULAB_BUILD_CUDA", "") == "1"


def _cache_root() -> Path:
    if os.environ.get("IOULAB_EXTENSIONS_DIR"):
        return Path(os.environ["IOULAB_EXTENSIONS_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ioulab" / "extensions"


def build_hash(with_cuda: bool) -> str:
    """Hash of everything that changes the binary: compiled sources, torch, CUDA flag, flags, archs."""
    digest = hashlib.sha256()
    src = source_dir()
    for name in sorted(_CPU_SOURCES + _HEADERS + (_CUDA_SOURCES if with_cuda else ())):
        digest.update(name.encode())
        digest.update((src / name).read_bytes())
    digest.update(f"torch={torch.__version__};cuda={with_cuda};cuda_version={torch.version.cuda}".encode())
    digest.update(f"py={sys.version_info[:2]};flags={_CXX_FLAGS}{_LD_FLAGS}{_NVCC_FLAGS}".encode())
    if with_cuda:
        digest.update(os.environ.get("TORCH_CUDA_ARCH_LIST", "").encode())
    return digest.hexdigest()[:16]


def _prepare_cuda_env() -> None:
    """Make torch's CUDA build find the right toolkit and architectures.

    torch guesses CUDA_HOME from `which nvcc`; on this machine nvcc is a wrapper in
    /usr/local/bin, so the guess is /usr/local and the link fails with -lcudart.
    """
    if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH"):
        if Path("/usr/local/cuda/bin/nvcc").exists():
            os.environ["CUDA_HOME"] = "/usr/local/cuda"
    cpp_extension = _cpp_extension()
    # cpp_extension reads CUDA_HOME once, at import; keep its copy in step with the environment.
    if os.environ.get("CUDA_HOME") and cpp_extension.CUDA_HOME != os.environ["CUDA_HOME"]:
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = _DEFAULT_CUDA_ARCH


def load_extension(with_cuda: bool | None = None, verbose: bool = False) -> Path:
    """Compile (once) and load the extension; registers the ``torch.ops.ioulab`` PrRoIPool ops.

    Returns the build directory. Raises :class:`ExtensionBuildError` naming the build log on
    failure. Only one variant (CPU or CPU+CUDA) can be loaded per process: the ops are
    registered by name.
    """
    with_cuda = cuda_wanted() if with_cuda is None else with_cuda
    with _lock:
        if with_cuda in _loaded:
            return _loaded[with_cuda]
        if not with_cuda and True in _loaded:  # the CUDA build contains the CPU kernels
            return _loaded[True]
        if _loaded:
            raise ExtensionBuildError(
                f"the {'CPU' if with_cuda else 'CPU+CUDA'} build of the extension is already "
                "loaded in this process; the ops cannot be registered twice")
        if with_cuda:
            _prepare_cuda_env()
        build_dir = _build(with_cuda, verbose)
        _loaded[with_cuda] = build_dir
        return build_dir


def _cpp_extension():
    """torch.utils.cpp_extension, imported without its import-time CUDA_HOME warning.

    The module logs "No CUDA runtime is found, using CUDA_HOME=..." when imported on a machine
    with nvcc but no GPU; for a CPU build that is noise in every (Ray worker) process.
    """
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import torch.utils.cpp_extension as cpp_extension
    finally:
        logger.setLevel(level)
    return cpp_extension


def _build(with_cuda: bool, verbose: bool) -> Path:
    src = source_dir()
    digest = build_hash(with_cuda)
    sources = [src / s for s in _CPU_SOURCES + (_CUDA_SOURCES if with_cuda else ())]
    build_dir = _cache_root() / digest
    compile_and_load(f"ioulab_ops_{digest}", sources, build_dir, with_cuda, verbose)
    return build_dir


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def lock_owner(build_dir: Path) -> dict | None:
    """``{"pid", "host", "since"}`` of the process holding (or last holding) the build lock."""
    try:
        pid, host, since = (build_dir / _OWNER_NAME).read_text().split()
        return {"pid": int(pid), "host": host, "since": float(since)}
    except (OSError, ValueError):
        return None


def _describe(owner: dict | None) -> str:
    if owner is None:
        return "an unknown process"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner["since"]))
    return f"pid {owner['pid']} on {owner['host']} (since {started})"


def _remove_stale_torch_lock(build_dir: Path) -> None:
    """torch's loader keeps a ``lock`` file in the build dir. torch 2.14 flocks it (harmless when
    left behind); older versions (``FileBaton``) wait while it merely exists, so one left by a
    killed build hangs every later load. Called under :func:`build_lock`: a ``lock`` nobody holds
    is stale, and removed."""
    path = build_dir / _TORCH_LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held by a live torch build: leave it
    except BlockingIOError:
        return
    finally:
        os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # also torch's own flock'ed file, released but kept after every build
        _log.debug("removed the unheld loader lock file %s", path)


@contextlib.contextmanager
def build_lock(build_dir: Path, timeout: float | None = None, poll: float = 0.1):
    """Hold the cross-process build lock of ``build_dir`` (see the module docstring).

    Raises :class:`ExtensionBuildError` naming the holder and the path to delete when the lock is
    still held after ``timeout`` seconds (default ``$IOULAB_BUILD_LOCK_TIMEOUT`` or 1800), or at
    once when its recorded holder is a dead process on this host."""
    if timeout is None:
        timeout = float(os.environ.get("IOULAB_BUILD_LOCK_TIMEOUT", _LOCK_TIMEOUT))
    build_dir.mkdir(parents=True, exist_ok=True)
    path, host = build_dir / _LOCK_NAME, socket.gethostname()
    fd, acquired = os.open(path, os.O_RDWR | os.O_CREAT, 0o644), False
    try:
        start, reported, dead_since = time.monotonic(), False, {}
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                acquired = True
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            owner, now = lock_owner(build_dir), time.monotonic()
            waited = now - start
            if owner is not None and owner["host"] == host and not _pid_alive(owner["pid"]):
                dead_since.setdefault((owner["pid"], owner["since"]), now)
            dead = owner is not None and now - dead_since.get((owner["pid"], owner["since"]), now) > _DEAD_GRACE
            if dead or waited > timeout:
                why = "its recorded holder is dead" if dead else f"held for over {timeout:.0f} s"
                raise ExtensionBuildError(
                    f"the extension build lock {path} is {why} ({_describe(owner)}); if no build is "
                    f"running on any node sharing {build_dir}, delete {path} and retry")
            if not reported and waited > _REPORT_AFTER:
                _log.warning("waiting for the extension build in %s by %s", build_dir, _describe(owner))
                reported = True
            time.sleep(poll)
        (build_dir / _OWNER_NAME).write_text(f"{os.getpid()} {host} {time.time()}\n")
        _remove_stale_torch_lock(build_dir)
        yield path
    finally:
        if acquired:
            with contextlib.suppress(OSError):
                (build_dir / _OWNER_NAME).unlink()
        os.close(fd)  # releases the flock


def compile_and_load(name: str, sources: list[Path], build_dir: Path, with_cuda: bool,
                     verbose: bool = False, include_dirs: list[Path] = ()) -> None:
    """Compile `sources` into `build_dir` with ninja (if not up to date) and load the library,
    holding :func:`build_lock`.

    The sources' folders and `include_dirs` are on the include path.

    Raises ExtensionBuildError with the tail of the compiler output and the path of the full
    log (`build_dir/build.log`).
    """
    with build_lock(build_dir):
        _compile_and_load(name, sources, build_dir, with_cuda, verbose, include_dirs)


def _compile_and_load(name: str, sources: list[Path], build_dir: Path, with_cuda: bool,
                      verbose: bool, include_dirs: list[Path]) -> None:
    log = build_dir / "build.log"
    includes = sorted({str(Path(s).parent) for s in sources} | {str(d) for d in include_dirs})
    try:
        _cpp_extension().load(
            name=name,
            sources=[str(s) for s in sources],
            extra_cflags=list(_CXX_FLAGS),
            extra_ldflags=list(_LD_FLAGS),
            extra_cuda_cflags=list(_NVCC_FLAGS),
            extra_include_paths=includes,
            build_directory=str(build_dir),
            with_cuda=with_cuda,
            is_python_module=False,
            verbose=verbose,
        )
    except (RuntimeError, OSError, ImportError, ValueError) as error:
        # The loader puts the compiler output into the exception message; keep all of it in a
        # file and show the tail.
        text = str(error)
        log.write_text(f"sources: {[str(s) for s in sources]}\nwith_cuda: {with_cuda}\n"
                       f"CUDA_HOME: {os.environ.get('CUDA_HOME')}\n"
                       f"TORCH_CUDA_ARCH_LIST: {os.environ.get('TORCH_CUDA_ARCH_LIST')}\n\n{text}\n")
        tail = "\n".join(text.strip().splitlines()[-15:])
        raise ExtensionBuildError(
            f"building the extension {name} ({'CPU+CUDA' if with_cuda else 'CPU'}) failed in "
            f"{build_dir}.\nFull build log: {log}\nLast lines:\n{tail}") from error
    log.write_text(f"ok: {name} sources={[str(s) for s in sources]} with_cuda={with_cuda}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cuda", action="store_true",
                        help="compile the CUDA kernels too (needs nvcc, not a GPU)")
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands")
    args = parser.parse_args(argv)
    with_cuda = args.cuda or cuda_wanted()
    try:
        build_dir = load_extension(with_cuda=with_cuda, verbose=args.verbose)
    except ExtensionBuildError as error:
        print(error, file=sys.stderr)
        return 1
    print(f"PrRoIPool extension ({'CPU+CUDA' if with_cuda else 'CPU'}) built and loaded: {build_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

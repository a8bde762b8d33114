"""The repo root on sys.path must never shadow the stdlib `platform` module (shared/DESIGN.md):
`ray job submit --working-dir .` puts the root first on every worker's PYTHONPATH."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_no_platform_init():
    assert not (REPO / "platform" / "__init__.py").exists()


def test_stdlib_platform_wins_with_repo_root_first():
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    code = "import platform, uuid, ray; assert platform.system(); print(platform.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert str(REPO) not in out.stdout  # the stdlib file, not the repo's folder
    # and our package is still importable from there
    out = subprocess.run([sys.executable, "-c", "import ioulab.platform.cli, platform; print(platform.system())"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


@pytest.mark.cluster
def test_ray_task_with_repo_as_working_dir():
    code = textwrap.dedent(f"""
        import ray
        ray.init(address="local", num_cpus=1, include_dashboard=False,
                 runtime_env={{"working_dir": {str(REPO)!r},
                              "excludes": ["runs/", "ray_results/", "*.db", ".git/", "mlruns/"]}})
        @ray.remote
        def probe():
            import platform, os
            import ioulab.detector.config
            return platform.system(), platform.__file__, os.getcwd()
        system, path, cwd = ray.get(probe.remote(), timeout=120)
        ray.shutdown()
        print(system, path, cwd)
        assert system == "Linux" and "platform.py" in path
    """)
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr

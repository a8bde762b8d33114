"""The suite-wide pytest-timeout settings: every test has a bound, long ones a longer one."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import TIMEOUTS

REPO = Path(__file__).resolve().parents[1]


def _timeout_of(item) -> float:
    marker = item.get_closest_marker("timeout")
    return marker.args[0] if marker else float(item.config.getini("timeout"))


def test_every_test_is_bounded(request):
    assert request.config.getini("timeout") == "300"
    assert request.config.getini("timeout_method") == "signal"  # fails the test, keeps the run
    assert _timeout_of(request.node) == 300


@pytest.mark.cluster
def test_cluster_tests_get_the_long_bound(request):
    assert _timeout_of(request.node) == TIMEOUTS["cluster"]


@pytest.mark.slow
@pytest.mark.timeout(42)
def test_an_explicit_bound_wins(request):
    assert _timeout_of(request.node) == 42


def test_a_hung_call_fails_one_test_not_the_run(tmp_path):
    """A blocking socket read (what a wedged MLflow server causes) is interrupted; the next test runs."""
    (tmp_path / "test_hang.py").write_text(textwrap.dedent("""
        import socket
        import pytest

        @pytest.mark.timeout(2)
        def test_hangs():
            server = socket.socket()
            server.bind(("127.0.0.1", 0))
            server.listen(1)
            client = socket.create_connection(server.getsockname())
            client.recv(1)  # never answered

        def test_after():
            pass
    """))
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_hang.py"),
                          "-c", str(REPO / "pyproject.toml"), "--rootdir", str(tmp_path)],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert "1 failed, 1 passed" in out.stdout, out.stdout[-2000:]
    assert "Timeout" in out.stdout

"""The HTML report opens offline in a real browser: headless Chromium renders it to a screenshot."""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from tests.platform.report.helpers import cli

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (`apt-get install -y chromium`; "
                                             ".ci/run installs it): headless render test skipped")
def test_html_report_renders_in_headless_chromium(store, tmp_path):
    out = tmp_path / "report"
    rc, _, err = cli("report", "losses", "--tracking-uri", store.uri, "--out", out, "--no-log")
    assert rc == 0, err
    shot = tmp_path / "shot.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1400,1800",
           (out / "report.html").as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert shot.exists(), proc.stderr[-2000:]
    assert shot.stat().st_size > 50_000
    img = np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)
    assert img.shape[:2] == (1800, 1400)
    gray = img.mean(axis=2)
    assert gray.std() > 15                      # not a blank page
    assert (gray < 80).mean() > 0.002           # dark text (the tables)
    # The charts are embedded data URIs: their coloured lines and bars must have been drawn.
    saturation = img.max(axis=2) - img.min(axis=2)
    assert (saturation > 60).mean() > 0.01
    shutil.copy(shot, out / "screenshot.png")   # kept beside the report for a look


@pytest.mark.timeout(240)
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (`apt-get install -y chromium`; "
                                             ".ci/run installs it): headless render test skipped")
def test_html_report_with_intervals_renders_in_headless_chromium(ci_store, tmp_path):
    """The intervals' grey "within noise" cells, the real difference in green and the ΔAP chart's
    error bars all reach the screen."""
    out = tmp_path / "report"
    rc, _, err = cli("report", "ci", "--tracking-uri", ci_store.uri, "--out", out, "--no-log", "--resamples", "200")
    assert rc == 0, err
    html = (out / "report.html").read_text()
    assert 'class="noise"' in html and "within noise" in html and "real (95 %)" in html
    shot = tmp_path / "shot.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1400,1400",
           (out / "report.html").as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert shot.exists(), proc.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    green = (g - r > 60) & (g - b > 40)             # the real difference's cells (#2e7d32) and bars
    grey = (abs(r - 0x8a) < 12) & (abs(g - 0x8f) < 12) & (abs(b - 0x96) < 12)   # within-noise text
    assert green.mean() > 0.0005 and grey.sum() > 50
    shutil.copy(shot, out / "screenshot.png")

"""The HTML leaderboard opened in headless Chromium: the table and both plots must really render.

The screenshot is kept as a test artefact in tests/artifacts/leaderboard.png.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from eval.report import write_report
from tests.eval_fixtures import write_answer_eval_run, write_synthetic_runs

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,1000"]


def chromium() -> str:
    """Path of Debian's chromium, installed on the spot where possible, else skip saying why."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if shutil.which("apt-get") is None or not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("chromium is not installed and cannot be installed here (needs root and apt-get); "
                    "install Debian's `chromium` package to run the report rendering test")
    try:
        subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True, timeout=300)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True, capture_output=True, timeout=600,
                       env={"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    except (subprocess.SubprocessError, OSError) as exc:
        pytest.skip(f"could not install chromium with apt-get ({exc}); the report rendering test needs it")
    found = shutil.which("chromium")
    if not found:
        pytest.skip("apt-get installed chromium but it is not on PATH")
    return found


def _chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def report_page(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    write_synthetic_runs(root / "runs")
    write_answer_eval_run(root / "runs")
    info = write_report(root / "runs", root / "report", baseline="bm25")
    return Path(info["html"])


def test_page_is_self_contained(report_page):
    page = report_page.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "@import" not in page and "url(http" not in page
    assert page.count("<svg") == 2 and "<script>" in page and "<style>" in page


def test_answer_columns_and_quality_plot_come_from_an_eval_run(report_page):
    page = report_page.read_text(encoding="utf-8")
    runs_table = page[page.index('<table id="runs"'):]
    for header in ("Cache mode", "TTFT p50 (s)", "TTFT p90 (s)", "Questions/s", "chunk_hit_rate", "agreement"):
        assert f"<th>{header}</th>" in runs_table, header
    row = next(r for r in runs_table.split("<tr>") if r.startswith("<td>musique-rag</td>"))
    assert "<td>blend</td>" in row and "<td>1.430</td>" in row and "<td>0.600</td>" in row
    plot = page[page.index('id="plot-quality-ttft"'):page.index("<h2>Runs</h2>")]
    # the eval run's blend point and its full reference, beside the bench runs' modes
    assert "musique-rag · musique-rag (reference)" in plot and "musique-rag · musique-rag<" in plot


def test_headless_chromium_renders_table_and_plots(report_page, tmp_path):
    binary = chromium()
    url = report_page.resolve().as_uri()
    dom = _chromium(binary, tmp_path / "profile-dom", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    match = re.search(r'<body[^>]*data-rendered="([^"]+)"', dom.stdout)
    assert match, "the page's script did not run"
    rendered = json.loads(html.unescape(match.group(1)))
    assert rendered["rows"] == 4  # three retrieval systems and the answered eval run
    table_width, table_height = rendered["table"]
    assert table_width > 300 and table_height > 60
    assert len(rendered["plots"]) == 2 and all(w > 300 and h > 200 for w, h in rendered["plots"])

    screenshot = tmp_path / "leaderboard.png"
    shot = _chromium(binary, tmp_path / "profile-shot", f"--screenshot={screenshot}", url)
    assert shot.returncode == 0 and screenshot.is_file(), shot.stderr[-2000:]
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(screenshot, ARTIFACTS / "leaderboard.png")

    from PIL import Image

    pixels = np.asarray(Image.open(screenshot).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (1000, 1400)

    def count(rgb: tuple[int, int, int]) -> int:
        return int((np.abs(pixels - np.array(rgb)).sum(axis=2) <= 12).sum())

    assert count((0xe6, 0xf4, 0xea)) > 500   # best-per-column cells (table rendered with its styles)
    assert count((0x1f, 0x77, 0xb4)) > 2000  # matplotlib C0: the first system's bars
    assert count((0xff, 0x7f, 0x0e)) > 2000  # C1: the second system's bars
    assert count((0x13, 0x73, 0x33)) > 10    # the ▲ significance marks

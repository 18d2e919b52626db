"""The example report opens in headless Debian chromium without errors, sorts, is light
(<= 2 MB, load event < 1 s) and needs no horizontal scroll at 1280 px."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = Path(__file__).parent / "data" / "example_run"
CHROMIUM = Path("/usr/bin/chromium")

pytestmark = [
    pytest.mark.chromium,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install -y chromium)"),
]


def _check(*args: str, scaled: bool = True) -> subprocess.CompletedProcess:
    """The checker; its 1 s load limit scales with the load per core of a shared machine
    (`--scale-load-limit`), so a busy CI box does not fail a light page."""
    extra = ["--scale-load-limit"] if scaled else []
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "check_report_renders.py"), *args, *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_example_report_renders_in_chromium(tmp_path: Path):
    run_dir = tmp_path / "example_run"
    shutil.copytree(EXAMPLE, run_dir)
    shot = tmp_path / "report.png"
    proc = _check(str(run_dir), "--screenshot", str(shot))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK" in proc.stdout
    assert "scrollWidth 1280 <= innerWidth 1280" in proc.stdout and "load " in proc.stdout
    assert shot.exists() and shot.stat().st_size > 10_000


def test_checker_catches_page_errors(tmp_path: Path):
    """The checker itself fails on a script error and on an external resource."""
    run_dir = tmp_path / "example_run"
    shutil.copytree(EXAMPLE, run_dir)
    assert _check(str(run_dir)).returncode == 0
    html = (run_dir / "report.html").read_text(encoding="utf-8")
    bad = tmp_path / "bad.html"
    bad.write_text(html.replace("</main>", '</main><script>noSuchFunction();</script>'
                                           '<img src="https://example.invalid/x.png">'), encoding="utf-8")
    proc = _check(str(bad))
    assert proc.returncode == 1
    assert "noSuchFunction" in proc.stderr and "failed to load" in proc.stderr


def test_checker_catches_wide_and_heavy_pages(tmp_path: Path):
    """Positive controls of the lightness checks: a summary wider than the window, a page
    over the size limit and a load slower than the limit each fail."""
    from suite.report import render_report

    run_dir = tmp_path / "example_run"
    shutil.copytree(EXAMPLE, run_dir)
    html = render_report(run_dir).read_text(encoding="utf-8")      # passes the checker: test above
    wide = tmp_path / "wide.html"
    wide.write_text(html.replace('<table class="summary" id="summary-table">',
                                 '<table class="summary" id="summary-table" style="min-width:1900px">'),
                    encoding="utf-8")
    proc = _check(str(wide))
    assert proc.returncode == 1 and "horizontal scroll" in proc.stderr
    proc = _check(str(run_dir / "report.html"), "--max-bytes", "1000", "--max-load-ms", "0", scaled=False)
    assert proc.returncode == 1
    assert "bytes (limit 1,000)" in proc.stderr and "slow to open" in proc.stderr

"""The HTML report renders from a run folder alone, self-contained, for awkward runs too."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from suite.report import render_report
from suite.results import read_results

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = Path(__file__).parent / "data" / "example_run"
SECTIONS = ["run", "leaderboard", "threat-model", "roc", "agreement", "per-site", "per-label", "cost",
            "extra-metrics", "failed"]
LABELS = ["Atelectasis", "Cardiomegaly", "Effusion"]


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    dst = tmp_path / "example_run"
    shutil.copytree(EXAMPLE, dst)
    return dst


def _section(html: str, sid: str) -> str:
    m = re.search(rf'<section id="{sid}">(.*?)</section>', html, flags=re.S)
    assert m, f"section {sid} missing"
    return m.group(1)


def test_report_renders_all_sections(run_dir):
    out = render_report(run_dir)
    assert out == run_dir / "report.html"
    html = out.read_text(encoding="utf-8")
    for sid in SECTIONS:
        _section(html, sid)
    assert "example-20250101" in html and "0123456789ab" in html and "densenet121-res224-all" in html
    assert "torch 2.14.0" in html                           # versions
    assert 'id="leaderboard-table"' in html and 'class="sortable"' in html


def test_report_is_self_contained(run_dir):
    html = render_report(run_dir).read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html, flags=re.I)
    assert not re.search(r"@import|url\(\s*['\"]?https?:", html, flags=re.I)
    assert "<link" not in html                              # CSS is inline
    assert re.search(r"<style>.*</style>", html, flags=re.S)
    assert re.search(r"<script>.*addEventListener\(\"click\"", html, flags=re.S)
    assert [p.name for p in run_dir.iterdir() if p.name.startswith("report")] == ["report.html"]


def test_one_roc_figure_per_label(run_dir):
    html = render_report(run_dir).read_text(encoding="utf-8")
    roc = _section(html, "roc")
    figures = re.findall(r'<figure class="roc" data-label="([^"]+)">\s*<svg', roc)
    assert figures == LABELS
    # every backend with predictions is overlaid, with its AUC in the legend
    for bid in ("plaintext", "mpc", "tee"):
        assert roc.count(f"{bid} (AUC ") == len(LABELS)


def test_leaderboard_badges_and_values(run_dir):
    html = render_report(run_dir).read_text(encoding="utf-8")
    board = _section(html, "leaderboard")
    rows = re.findall(r"<tr class=\"([^\"]*)\">(.*?)</tr>", board, flags=re.S)
    by_name = {re.search(r'data-sort="([^"]+)"', r).group(1): (cls, r) for cls, r in rows}
    assert list(by_name) == ["plaintext", "mpc", "tee", "he"]
    assert "SIMULATED" in by_name["tee"][1] and "simulated" in by_name["tee"][0]
    assert "SIMULATED" not in by_name["mpc"][1]
    assert "failed" in by_name["he"][0]
    results = read_results(EXAMPLE / "results.jsonl")
    mpc = results[(results.backend_id == "mpc") & (results.metric == "auroc") & (results.site == "__all__")
                  & (results.label == "__macro__")].iloc[0]
    assert f"{mpc.value:.3f} [{mpc.ci_low:.3f}, {mpc.ci_high:.3f}]" in by_name["mpc"][1]
    # projected metrics are badged in the header and kept apart from measured ones
    head = re.search(r"<thead>(.*?)</thead>", board, flags=re.S).group(1)
    assert head.count("projected</span>") == 3                       # lan, wan, sgx
    extras = _section(html, "extra-metrics")
    assert "projected_latency_per_image_wan" in extras and "attestation_time" in extras
    assert "projected</span>" in extras


def test_threat_matrix_and_failures(run_dir):
    html = render_report(run_dir).read_text(encoding="utf-8")
    tm = _section(html, "threat-model")
    for asset in ("input images", "model weights", "training membership", "predictions"):
        assert asset in tm
    assert tm.count(">✓</td>") == 5                                   # mpc 2, tee 2, he 1
    assert "semi-honest" in tm and "no collusion" in tm and "classifier head only" in tm
    failed = _section(html, "failed")
    assert "he" in failed and "MemoryError: CKKS context" in failed
    agreement = _section(html, "agreement")
    assert agreement.count("<svg") == 2                                # mpc and tee vs plaintext
    assert "he did not finish" in agreement
    assert _section(html, "per-site").count("<svg") == 1 and "site_b" in _section(html, "per-site")
    assert _section(html, "cost").count("<svg") == 1


def test_report_imports_no_backend_or_torch(run_dir):
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "import suite.report\n"
        f"suite.report.render_report(Path({str(run_dir)!r}))\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'backends', 'crypten', 'tenseal',"
        " 'opacus', 'flwr'))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------- awkward runs

def _subset(run_dir: Path, keep: list[str]) -> None:
    meta = json.loads((run_dir / "run.json").read_text())
    meta["backends"] = {b: v for b, v in meta["backends"].items() if b in keep}
    (run_dir / "run.json").write_text(json.dumps(meta))
    lines = [ln for ln in (run_dir / "results.jsonl").read_text().splitlines() if json.loads(ln)["backend_id"] in keep]
    (run_dir / "results.jsonl").write_text("\n".join(lines) + "\n")
    preds = pd.read_parquet(run_dir / "predictions.parquet")
    preds[preds.backend_id.isin(keep)].to_parquet(run_dir / "predictions.parquet", index=False)


def test_plaintext_and_null_only(run_dir):
    """A run of the reference and the null backend (harness overhead, constant output)."""
    _subset(run_dir, ["plaintext"])
    meta = json.loads((run_dir / "run.json").read_text())
    meta["backends"]["null"] = {**meta["backends"]["plaintext"], "backend": "null", "reference": None,
                                "options": {}, "versions": {}}
    (run_dir / "run.json").write_text(json.dumps(meta))
    rows = [json.loads(ln) for ln in (run_dir / "results.jsonl").read_text().splitlines()]
    null_rows = [{**r, "backend": "null", "backend_id": "null"} for r in rows
                 if r["metric"] in ("latency_per_image_p50", "bytes_per_image", "n_images")]
    with open(run_dir / "results.jsonl", "a") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in null_rows)
    preds = pd.read_parquet(run_dir / "predictions.parquet")
    null = preds.assign(backend_id="null", backend="null", prob=0.5)
    pd.concat([preds, null]).to_parquet(run_dir / "predictions.parquet", index=False)

    html = render_report(run_dir).read_text(encoding="utf-8")
    assert "No backend has a reference to compare with." in html
    assert "Every backend configuration finished." in html
    assert "No backend reported extra metrics." in html
    assert len(re.findall(r'<figure class="roc"', html)) == len(LABELS)
    assert "null (AUC 0.500)" in html


def test_missing_predictions_for_a_backend(run_dir):
    preds = pd.read_parquet(run_dir / "predictions.parquet")
    preds[preds.backend_id != "mpc"].to_parquet(run_dir / "predictions.parquet", index=False)
    html = render_report(run_dir).read_text(encoding="utf-8")
    assert "no predictions for mpc" in html
    assert "mpc (AUC " not in html
    assert "0.912 [0.856, 0.956]" in html                               # its result rows still show


def test_missing_reference_predictions_and_parquet(run_dir):
    preds = pd.read_parquet(run_dir / "predictions.parquet")
    preds[preds.backend_id != "plaintext"].to_parquet(run_dir / "predictions.parquet", index=False)
    assert "no predictions for its reference plaintext" in render_report(run_dir).read_text(encoding="utf-8")
    (run_dir / "predictions.parquet").unlink()
    html = render_report(run_dir).read_text(encoding="utf-8")
    assert "predictions.parquet is missing" in html and "No predictions to draw." in html


def test_only_a_failed_backend_and_no_run_json(run_dir):
    _subset(run_dir, ["he"])
    (run_dir / "run.json").unlink()
    html = render_report(run_dir).read_text(encoding="utf-8")
    assert "run.json is missing" in html
    assert "MemoryError" in _section(html, "failed")
    assert "No finished backend has cost rows." in html


def test_empty_run_folder(tmp_path):
    html = render_report(tmp_path).read_text(encoding="utf-8")
    assert "no backend configurations in this run" in html
    assert "results.jsonl has no rows." in html

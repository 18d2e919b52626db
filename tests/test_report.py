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
SECTIONS = ["summary", "leaderboard", "training", "threat-model", "roc", "agreement", "per-site", "per-label",
            "privacy-utility", "rounds", "extra-metrics", "failed", "run"]
LABELS = ["Atelectasis", "Cardiomegaly", "Effusion"]


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    dst = tmp_path / "example_run"
    shutil.copytree(EXAMPLE, dst)
    return dst


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> tuple[Path, str]:
    """The example run's report, rendered once for the tests that only read it (matplotlib
    is most of a render's time)."""
    dst = tmp_path_factory.mktemp("rendered") / "example_run"
    shutil.copytree(EXAMPLE, dst)
    out = render_report(dst)
    return out, out.read_text(encoding="utf-8")


def _section(html: str, sid: str) -> str:
    m = re.search(rf'<section id="{sid}"[^>]*>(.*?)</section>', html, flags=re.S)
    assert m, f"section {sid} missing"
    return m.group(1)


def test_report_renders_all_sections(rendered):
    out, html = rendered
    assert out.name == "report.html"
    for sid in SECTIONS:
        _section(html, sid)
    assert "example-20250101" in html and "0123456789ab" in html and "densenet121-res224-all" in html
    assert "torch 2.14.0" in html                           # versions
    assert 'id="leaderboard-table"' in html and 'class="sortable"' in html


def test_report_is_self_contained(rendered):
    out, html = rendered
    run_dir = out.parent
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html, flags=re.I)
    assert not re.search(r"@import|url\(\s*['\"]?https?:", html, flags=re.I)
    assert "<link" not in html                              # CSS is inline
    assert re.search(r"<style>.*</style>", html, flags=re.S)
    assert re.search(r"<script>.*addEventListener\(\"click\"", html, flags=re.S)
    assert [p.name for p in run_dir.iterdir() if p.name.startswith("report")] == ["report.html"]


def test_summary_comes_first_one_line_per_technique(rendered):
    html = rendered[1]
    body = html[html.index("<main>"):]
    assert body.index('id="summary"') < body.index('id="leaderboard"') < body.index('id="threat-model"')
    summary = _section(html, "summary")
    rows = re.findall(r"<tr class=\"[^\"]*\">(.*?)</tr>", summary, flags=re.S)
    techs = [re.search(r'<td class="tech"[^>]*>\s*([\w-]+)', r).group(1) for r in rows]
    assert techs == ["plaintext", "mpc", "tee", "he", "dp", "fl"]
    by = dict(zip(techs, rows))
    # what, from whom, trusting what; ΔAUROC with CI; cost as multiples of plaintext
    assert "input images, model weights" in by["mpc"] and "the other party" in by["mpc"]
    assert "no collusion; trusted dealer" in by["mpc"]
    assert "-0.001 [-0.004, +0.000]" in by["mpc"] and "×214" in by["mpc"] and "460 MB" in by["mpc"]
    assert "WAN 63 s" in by["mpc"] and "proj." in by["mpc"]
    assert "SIMULATED" in by["tee"] and "FAILED" in by["he"]
    # dp: its private configuration, not the control; training time x its reference
    assert "target_epsilon=3.0" in by["dp"] and "×3.3" in by["dp"] and "ε 2.97" in by["dp"]
    # 1,000 images: CPU (3.6 s/img x 1000 / 3600 x $0.05) + wire (460 MB x 1000 x $0.09/GB)
    assert "$41.45" in by["mpc"] and "CPU $0.05" in by["mpc"] and "wire $41.40" in by["mpc"]
    assert "USD 0.05 per CPU-hour, USD 0.09 per GB" in summary
    assert summary.count("<svg") == 1 and 'aria-label="cost-utility"' in summary


def test_cost_utility_chart_marks_projected_and_simulated(rendered):
    summary = _section(rendered[1], "summary")
    svg = summary[summary.index("<svg"):summary.index("</svg>")]
    for text in ("projected (network model)", "simulated", "lan", "wan", "inference: latency per image (log)",
                 "training: training time (log)", "target_epsilon=3.0"):
        assert text in svg, text


def test_tracks_apart_and_guarantee_in_footnotes(rendered):
    html = rendered[1]
    inference, training = _section(html, "leaderboard"), _section(html, "training")
    assert "dp[" not in re.sub(r'title="[^"]*"', "", inference) and "mpc" not in training
    assert "ε (δ, level)" in training and "× ctrl" in training and "attack AUROC" in training
    assert "latency / img" in inference and "latency" not in training
    assert "2.97 (δ=1.0e-05)" in training and "0.51" in training
    # the guarantee is a tooltip and a footnote key, not a column
    assert "guarantee" not in re.findall(r"<thead>(.*?)</thead>", inference, flags=re.S)[0]
    assert 'title="protects input_images, model_weights from the other party; guarantee: 2PC' in inference
    assert re.search(r'<sup class="key"><a href="#tm-2">2</a></sup>', inference)
    tm = _section(html, "threat-model")
    assert re.search(r'<li id="tm-2" value="2"><b>mpc</b> — protects input_images, model_weights', tm)


def _table_rows(section: str) -> tuple[list[str], list[list[str]]]:
    """(header texts, cell texts per row) of the first table in an HTML section."""
    head = re.findall(r"<th[^>]*>(.*?)</th>", re.search(r"<thead>(.*?)</thead>", section, flags=re.S).group(1))
    body = re.search(r"<tbody>(.*?)</tbody>", section, flags=re.S).group(1)
    rows = [[re.sub(r"<[^>]+>.*?</[^>]+>|<[^>]+>", "", c).strip() for c in
             re.findall(r"<td[^>]*>(.*?)</td>", tr, flags=re.S)]
            for tr in re.findall(r"<tr[^>]*>(.*?)</tr>", body, flags=re.S)]
    return [re.sub(r"<[^>]+>", "", h) for h in head], rows


def test_training_table_reuses_the_leaderboard_training_columns(rendered):
    """One definition of the training columns: the report's training table shows the same
    headers and cells as the leaderboard's `training_cells` for every training row."""
    import html as html_lib

    from suite.leaderboard import TRAINING_HEADERS, build_leaderboard, read_run_meta, training_cells

    out, html = rendered
    head, rows = _table_rows(_section(html, "training"))
    head = [html_lib.unescape(h) for h in head]
    board = build_leaderboard(read_results(out.parent / "results.jsonl"), read_run_meta(out.parent))
    training = board[board["track"] == "training"]
    assert len(training) >= 2 and len(rows) == len(training)
    cols = [head.index(h) for h in TRAINING_HEADERS if h in head]
    assert len(cols) >= 3 and head[1] == "time" and head[2] == "× ctrl"
    for (_, r), cells in zip(training.iterrows(), rows):
        assert cells[0].startswith(r["backend_id"])
        expected = dict(zip(TRAINING_HEADERS, training_cells(r)))
        shown = {head[j]: html_lib.unescape(cells[j]) for j in cols}
        assert shown == {h: expected[h] for h in shown}, r["backend_id"]


def test_training_ratio_is_the_harness_row_in_every_table(run_dir):
    """The harness's `fit_time_ratio` row (training steps vs its control's) is what the
    report's training table and summary show, as leaderboard.md does; a second definition
    from the raw fit times (41 s / 12.5 s = ×3.3, the positive control) would disagree."""
    dp = "dp[target_epsilon=3.0]"
    rows = [json.loads(ln) for ln in (run_dir / "results.jsonl").read_text().splitlines()]
    fit = next(r for r in rows if r["backend_id"] == dp and r["metric"] == "fit_time")
    with open(run_dir / "results.jsonl", "a") as fh:
        fh.write(json.dumps({**fit, "metric": "fit_time_ratio", "value": 1.25, "unit": "x"}) + "\n")
    html = render_report(run_dir).read_text(encoding="utf-8")
    head, table = _table_rows(_section(html, "training"))
    ratio = head.index("× ctrl")
    mine = next(cells for cells in table if cells[0].startswith(dp))
    assert mine[ratio] == "×1.2"
    summary = _section(html, "summary")
    dp_line = next(r for r in re.findall(r"<tr class=\"[^\"]*\">(.*?)</tr>", summary, flags=re.S)
                   if "target_epsilon=3.0" in r)
    assert "×1.2" in dp_line and "×3.3" not in dp_line


def test_roc_small_multiples(rendered):
    roc = _section(rendered[1], "roc")
    assert roc.count("<svg") == 1                      # one figure, one panel per configuration
    for bid in ("mpc", "tee", "dp[target_epsilon=3.0]", "fl"):
        assert f">{bid}<" in roc, bid
    assert roc.count("plaintext 0.") >= 5               # plaintext's curve in every panel


def test_leaderboard_badges_and_values(rendered):
    html = rendered[1]
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
    assert head.count("projected</span>") == 2                       # lan, wan
    extras = _section(html, "extra-metrics")
    assert "projected_latency_per_image (phase online, network wan)" in extras and "attestation_time" in extras
    assert "projected</span>" in extras and "simulated</span>" in extras
    assert "projected_latency_per_image_sgx" in extras               # the older name form still shows


def test_per_site_heat_map_and_rounds(rendered):
    html = rendered[1]
    site = _section(html, "per-site")
    heat = site[site.index('id="site-heatmap"'):site.index("</table>")]
    assert heat.count("<tr>") == 7 and "site_b" in heat and "background:hsl(" in heat
    assert "<details><summary>per-site table" in site and 'id="per-site-table"' in site
    assert _section(html, "rounds").count("<svg") == 1 and "validation AUROC" in _section(html, "rounds")
    assert _section(html, "privacy-utility").count("<svg") == 1


def test_threat_matrix_and_failures(rendered):
    html = rendered[1]
    tm = _section(html, "threat-model")
    for asset in ("input images", "model weights", "training membership", "predictions"):
        assert asset in tm
    assert tm.count(">✓</td>") == 7                                   # mpc 2, tee 2, he 1, dp 1, fl 1
    assert "semi-honest" in tm and "no collusion" in tm and "classifier head only" in tm
    failed = _section(html, "failed")
    assert "he" in failed and "MemoryError: CKKS context" in failed
    agreement = _section(html, "agreement")
    assert agreement.count("<svg") == 4                                # mpc, tee, dp, fl vs their references
    assert "he did not finish" in agreement


def test_report_is_light(rendered):
    """Figures are thinned and rasterised: the 7-configuration example stays far below 2 MB."""
    out, html = rendered
    assert out.stat().st_size < 500_000
    assert "data:image/png;base64" in html                         # scatter clouds are pixels
    assert not re.search(r"\d\.\d{4,}", " ".join(re.findall(r'\sd="([^"]*)"', html)))


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
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=400)
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
    assert "plaintext 0.5" not in html and ">null<" in _section(html, "roc")   # null's own panel
    assert "this 0.500" in _section(html, "roc")
    assert 'id="training"' not in html                               # no training rows, no table


def test_missing_predictions_for_a_backend(run_dir):
    preds = pd.read_parquet(run_dir / "predictions.parquet")
    preds[preds.backend_id != "mpc"].to_parquet(run_dir / "predictions.parquet", index=False)
    html = render_report(run_dir).read_text(encoding="utf-8")
    assert "no predictions for mpc" in html
    assert ">mpc<" not in _section(html, "roc")
    results = read_results(EXAMPLE / "results.jsonl")
    mpc = results[(results.backend_id == "mpc") & (results.metric == "auroc") & (results.site == "__all__")
                  & (results.label == "__macro__")].iloc[0]
    assert f"{mpc.value:.3f} [{mpc.ci_low:.3f}, {mpc.ci_high:.3f}]" in html   # its result rows still show


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
    assert "No finished configuration has cost rows." in html


def test_empty_run_folder(tmp_path):
    html = render_report(tmp_path).read_text(encoding="utf-8")
    assert "no backend configurations in this run" in html
    assert "results.jsonl has no rows." in html


def test_report_options():
    from suite.report import ReportOptions

    assert ReportOptions().cpu_hour_usd == 0.05 and ReportOptions().egress_usd_per_gb == 0.09
    assert ReportOptions.from_dict({"cpu_hour_usd": 0.1}).cpu_hour_usd == 0.1
    with pytest.raises(ValueError, match="unknown report option.*cpu_hour"):
        ReportOptions.from_dict({"cpu_hour": 0.1})


def test_prices_change_the_cost_line():
    import json

    from suite.leaderboard import build_leaderboard
    from suite.report import ReportOptions
    from suite.report.summary import summary_lines

    board = build_leaderboard(read_results(EXAMPLE / "results.jsonl"), json.loads((EXAMPLE / "run.json").read_text()))
    mpc = {s["technique"]: s for s in summary_lines(board, ReportOptions(cpu_hour_usd=1.0, egress_usd_per_gb=0.0))}["mpc"]
    assert mpc["cost_cpu"] == "$1.00" and mpc["cost_wire"] == "$0" and mpc["cost"] == "$1.00"  # 3.6 s x 1000 / 3600
    default = {s["technique"]: s for s in summary_lines(board)}["mpc"]
    assert default["cost"] == "$41.45"


def _append_rows(run_dir: Path, like: str, rows: list[dict]) -> None:
    """Append extra rows shaped like `like`'s fit_time row (run id, dataset, ...)."""
    lines = [json.loads(ln) for ln in (run_dir / "results.jsonl").read_text().splitlines()]
    base = next(r for r in lines if r["backend_id"] == like and r["metric"] == "fit_time")
    with open(run_dir / "results.jsonl", "a") as fh:
        for r in rows:
            fh.write(json.dumps({**base, "reference": None, **r}) + "\n")


def test_training_budget_stated_once_per_entry(run_dir):
    """Every row of one training entry that spent the same budget is listed under one line;
    a row with another budget gets its own line (positive control), one without is named."""
    dp_budget = "training budget shared by every row of this dp entry: 20 epochs x 7 Poisson steps"
    for bid in ("dp[target_epsilon=3.0]", "dp[target_epsilon=inf]"):
        _append_rows(run_dir, bid, [{"backend_id": bid, "metric": "training_budget", "value": 35840,
                                     "unit": "samples", "note": dp_budget}])
    html = render_report(run_dir).read_text(encoding="utf-8")
    budget = _section(html, "training").split('id="training-budget"')[1]
    items = re.findall(r"<li>(.*?)</li>", budget, flags=re.S)
    dp_lines = [i for i in items if "20 epochs x 7 Poisson steps" in i]
    assert len(dp_lines) == 1
    assert "dp[target_epsilon=3.0], dp[target_epsilon=inf]" in dp_lines[0]
    assert any("no training budget reported" in i and "fl" in i for i in items)
    # positive control: the control trained on another budget shows up as a second line
    _append_rows(run_dir, "dp[target_epsilon=inf]", [{
        "backend_id": "dp[target_epsilon=inf]", "metric": "training_budget", "value": 1,
        "unit": "samples", "note": "training budget shared by every row of this dp entry: 2 epochs"}])
    from suite.leaderboard import build_leaderboard, read_run_meta
    from suite.report import training_budgets

    results = read_results(run_dir / "results.jsonl")
    lines = training_budgets(build_leaderboard(results, read_run_meta(run_dir)), results)
    assert [len(b["backends"]) for b in lines if "training budget shared" in b["text"]] == [1, 1]

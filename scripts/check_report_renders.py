"""Open a report in headless Debian chromium and check that it renders.

    .venv/bin/python scripts/check_report_renders.py RUN_DIR_OR_HTML [--screenshot out.png]

Given a run folder, renders report.html first (suite.report.render_report). Then it
loads the page with network access off, dumps the DOM and fails (exit 1) when:
  - chromium logs a console error or an uncaught exception,
  - the dumped DOM lacks the leaderboard table, an embedded figure, or the marker
    the page's script sets when it has run,
  - clicking a numeric leaderboard header does not sort its rows (checked through a
    probe script added to a temporary copy of the page, never to the report itself),
  - the page is larger than --max-bytes (default 2 MB) or takes longer than
    --max-load-ms (default 1000 ms, the page's own navigation timing to its load event),
  - at a 1280 px wide window the page, or a table of the summary or the track tables,
    needs horizontal scrolling (document.documentElement.scrollWidth > innerWidth).
Exit 2 when chromium is missing or the input does not exist.
"""

from __future__ import annotations

import argparse
import html
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-extensions", "--disable-default-apps", "--mute-audio", "--hide-scrollbars",
    "--enable-logging=stderr", "--v=0",
    # no network at all: every host resolves nowhere, so an external resource would fail loudly
    "--host-resolver-rules=MAP * ~NOTFOUND",
]

# Put first in <head> of a temporary copy: records console.error/console.warn calls,
# uncaught exceptions, rejected promises and resources that failed to load (capture
# phase), which chromium's stderr log does not tell apart from console.log.
RECORDER = """
<script id="render-check-recorder">
window.__renderCheck = [];
(function () {
  var rec = function (kind, msg) { window.__renderCheck.push(kind + ": " + msg); };
  ["error", "warn"].forEach(function (level) {
    var orig = console[level];
    console[level] = function () {
      rec("console." + level, Array.prototype.join.call(arguments, " "));
      return orig.apply(console, arguments);
    };
  });
  window.addEventListener("error", function (ev) {
    if (ev.target && ev.target !== window) {
      rec("failed to load", (ev.target.src || ev.target.href || ev.target.tagName));
    } else {
      rec("uncaught", ev.message);
    }
  }, true);
  window.addEventListener("unhandledrejection", function (ev) { rec("unhandled rejection", String(ev.reason)); });
})();
</script>
"""

# Put before </body>: after the page has loaded, clicks the leaderboard's "macro AUROC"
# header once (ascending) and writes the column's sort keys, in displayed order, and
# everything the recorder caught into the DOM for this script to read back.
PROBE = """
<script id="render-check-probe">
window.addEventListener("load", function () {
  var out = document.createElement("pre");
  out.id = "render-check";
  try {
    var t = document.getElementById("leaderboard-table");
    var ths = t.tHead.rows[0].cells, col = -1;
    for (var i = 0; i < ths.length; i++) { if (/macro AUROC/.test(ths[i].textContent)) { col = i; } }
    ths[col].click();
    var keys = Array.prototype.map.call(t.tBodies[0].rows, function (r) {
      return r.cells[col].getAttribute("data-sort");
    });
    out.textContent = "SORTED:" + keys.join("|") + ":" + ths[col].getAttribute("aria-sort");
  } catch (e) {
    out.textContent = "PROBE-ERROR:" + e;
  }
  var layout = document.createElement("pre");
  layout.id = "render-check-layout";
  var nav = (performance.getEntriesByType && performance.getEntriesByType("navigation")[0]) || null;
  var loadMs = nav && nav.loadEventStart > 0 ? nav.loadEventStart : performance.now();
  var wide = [];
  ["summary", "leaderboard", "training"].forEach(function (id) {
    var sec = document.getElementById(id);
    if (!sec) { return; }
    Array.prototype.forEach.call(sec.querySelectorAll(".scroll, table, figure"), function (el) {
      if (el.scrollWidth > el.clientWidth + 1 || el.getBoundingClientRect().right > window.innerWidth + 1) {
        wide.push(id + ">" + el.tagName.toLowerCase() + (el.id ? "#" + el.id : "") + " " + el.scrollWidth + "px");
      }
    });
  });
  layout.textContent = "LAYOUT:" + document.documentElement.scrollWidth + ":" + window.innerWidth + ":"
    + Math.round(loadMs) + ":" + wide.join(",");
  var errs = document.createElement("pre");
  errs.id = "render-check-errors";
  errs.textContent = window.__renderCheck.join("\\n");
  document.body.appendChild(out);
  document.body.appendChild(errs);
  document.body.appendChild(layout);
});
</script>
"""

# chromium logs every console message as `...:INFO:CONSOLE:<line>] "text", source: ...`
# (older builds: `CONSOLE(<line>)`), whatever its level. The report itself never logs,
# so any console line from the page is a failure; the recorder above says which kind.
_CONSOLE = re.compile(r"CONSOLE[:(]\d+\)?\]|Uncaught")


def console_errors(stderr: str) -> list[str]:
    """Lines of chromium's log that come from the page's console (errors, exceptions, stray logs)."""
    return [line for line in stderr.splitlines() if _CONSOLE.search(line)]


LOAD_TRIES = 3
WIDTH = 1280          # the window the no-horizontal-scroll check and the screenshot use


def run_chromium(html: Path, workdir: Path, screenshot: Path | None = None,
                 timeout: int = 90, height: int = 900) -> subprocess.CompletedProcess:
    profile = workdir / "profile"
    profile.mkdir(exist_ok=True)
    cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", f"--window-size={WIDTH},{height}"]
    if screenshot is not None:
        cmd += [f"--screenshot={screenshot}"]
    else:
        cmd += ["--dump-dom"]
    cmd.append(html.resolve().as_uri())
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HOME": str(workdir)})


def check_layout(dom: str, max_load_ms: float) -> tuple[list[str], dict]:
    """Horizontal scroll at WIDTH px and load time, from the probe's LAYOUT line."""
    m = re.search(r'<pre id="render-check-layout">LAYOUT:(\d+):(\d+):(\d+):(.*?)</pre>', dom, flags=re.S)
    if not m:
        return ["the layout probe left no result"], {}
    scroll_w, inner_w, load_ms, wide = int(m.group(1)), int(m.group(2)), int(m.group(3)), m.group(4).strip()
    problems = []
    if scroll_w > inner_w:
        problems.append(f"horizontal scroll at {inner_w} px: document is {scroll_w} px wide")
    if wide:
        problems.append(f"horizontal scroll in the first screen at {inner_w} px: {html.unescape(wide)}")
    if load_ms > max_load_ms:
        problems.append(f"slow to open: load event after {load_ms} ms (limit {max_load_ms:g} ms)")
    return problems, {"scroll_width": scroll_w, "inner_width": inner_w, "load_ms": load_ms}


def check_dom(dom: str) -> list[str]:
    problems = []
    if 'id="leaderboard-table"' not in dom:
        problems.append("the leaderboard table is missing from the DOM")
    if not re.search(r"<svg\b", dom):
        problems.append("no embedded figure (<svg>) in the DOM")
    if 'data-sortable="ready"' not in dom:
        problems.append("the page's script did not run to the end (no data-sortable marker)")
    errs = re.search(r'<pre id="render-check-errors">(.*?)</pre>', dom, flags=re.S)
    if errs and errs.group(1).strip():
        problems += [f"page error: {html.unescape(e)}" for e in errs.group(1).splitlines() if e.strip()]
    m = re.search(r'<pre id="render-check">(.*?)</pre>', dom, flags=re.S)
    if not m:
        problems.append("the sort probe left no result")
    elif m.group(1).startswith("PROBE-ERROR"):
        problems.append(f"sort probe failed: {m.group(1)}")
    else:
        keys_text, direction = m.group(1)[len("SORTED:"):].rsplit(":", 1)
        keys = [float(k) for k in keys_text.split("|") if k]
        if direction != "ascending" or keys != sorted(keys):
            problems.append(f"clicking the macro AUROC header did not sort ascending: {keys} ({direction})")
        rows = keys_text.split("|")
        if "" in rows and rows[rows.index(""):] != [""] * (len(rows) - rows.index("")):
            problems.append("rows without a value are not sorted last")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Check that a report renders in headless chromium.")
    ap.add_argument("target", type=Path, help="a run folder (report is rendered) or a report.html")
    ap.add_argument("--screenshot", type=Path, help="also write a screenshot of the first screen (PNG)")
    ap.add_argument("--screenshot-height", type=int, default=900, help="window height of the screenshot")
    ap.add_argument("--max-bytes", type=int, default=2_000_000, help="largest acceptable report (bytes)")
    ap.add_argument("--max-load-ms", type=float, default=1000.0, help="slowest acceptable load (ms)")
    ap.add_argument("--scale-load-limit", action="store_true",
                    help="multiply --max-load-ms by the machine's load average per core when above 1 "
                         "(a shared, busy machine; the measured time is printed either way)")
    args = ap.parse_args(argv)

    if not Path(CHROMIUM).exists():
        print(f"chromium not found at {CHROMIUM} (apt-get install -y chromium)", file=sys.stderr)
        return 2
    target = args.target
    if target.is_dir():
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from suite.report import render_report

        page = render_report(target)
    elif target.is_file():
        page = target
    else:
        print(f"{target} does not exist", file=sys.stderr)
        return 2

    size = page.stat().st_size
    if args.scale_load_limit:
        per_core = os.getloadavg()[0] / (os.cpu_count() or 1)
        args.max_load_ms *= max(1.0, per_core)
    with tempfile.TemporaryDirectory(prefix="report-check-") as tmp:
        work = Path(tmp)
        # the page as shipped: must load without a single console error
        plain = run_chromium(page, work)
        # a copy with the sort probe appended before </body>
        probed = work / "probed.html"
        text = page.read_text(encoding="utf-8")
        cut = text.rfind("</body>")
        head = text.find("<head>") + len("<head>")
        probed.write_text(text[:head] + RECORDER + text[head:cut] + PROBE + text[cut:], encoding="utf-8")
        # The load time is the best of up to LOAD_TRIES loads: a cold renderer on a busy
        # machine can take a second for an empty page, which says nothing about the report.
        loads = []
        for _ in range(LOAD_TRIES):
            shutil.rmtree(work / "profile", ignore_errors=True)
            checked = run_chromium(probed, work)
            loads.append(check_layout(checked.stdout, args.max_load_ms)[1].get("load_ms", float("inf")))
            if loads[-1] <= args.max_load_ms:
                break

        problems = []
        for name, proc in (("report", plain), ("probe", checked)):
            if proc.returncode != 0:
                problems.append(f"chromium exited {proc.returncode} on the {name} page: {proc.stderr[-800:]}")
            problems += [f"console ({name}): {line.strip()}" for line in console_errors(proc.stderr)]
        if not plain.stdout.strip():
            problems.append("chromium dumped an empty DOM")
        problems += check_dom(checked.stdout)
        layout_problems, layout = check_layout(checked.stdout, args.max_load_ms)
        layout["tries"] = len(loads)
        problems += layout_problems
        if size > args.max_bytes:
            problems.append(f"report is {size:,} bytes (limit {args.max_bytes:,})")
        if 'id="leaderboard-table"' not in plain.stdout:
            problems.append("the leaderboard table is missing from the report's DOM")

        if args.screenshot is not None:
            shutil.rmtree(work / "profile", ignore_errors=True)
            args.screenshot.parent.mkdir(parents=True, exist_ok=True)
            shot = run_chromium(page, work, screenshot=args.screenshot.resolve(), height=args.screenshot_height)
            if shot.returncode != 0 or not args.screenshot.exists():
                problems.append(f"screenshot failed: {shot.stderr[-500:]}")

    if problems:
        print(f"FAIL {page}", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    n_svg = len(re.findall(r"<svg\b", plain.stdout))
    print(f"OK {page}: leaderboard table, {n_svg} figures, sortable columns, no console errors; "
          f"{size:,} bytes, load {layout.get('load_ms')} ms (best of {layout.get('tries')}), scrollWidth {layout.get('scroll_width')} <= "
          f"innerWidth {layout.get('inner_width')} (load limit {args.max_load_ms:.0f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

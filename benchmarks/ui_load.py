"""How heavy is MLflow's chart view on a study? Chart cards, and seconds to draw them (issue 14).

For each store: start ``resnet-lab ui`` on the study as a user does (seconds until it prints its
URL), open that URL's chart view (``&compareRunsMode=CHART``) in a fresh headless Chromium
profile (Debian's ``/usr/bin/chromium`` through Playwright; no browser download) and measure:

* chart sections and cards, read from the section headers ("test (2)"): MLflow draws a card per
  metric key and renders only the cards in view, so the headers are the count;
* seconds until the first chart is drawn (its plotly figure is in the page);
* seconds to scroll to the last chart and have it drawn: wheel steps of 800 px until the chart
  area no longer moves, then wait for the last card's plot;
* the main thread's long tasks (PerformanceObserver ``longtask``, > 50 ms each) during load and
  scroll, and during ``--idle`` seconds afterwards (MLflow re-fetches visible charts every 30 s).

Stores: the full-scale ``cifar10_paper`` layout that ``benchmarks/report_time.py`` builds (9 runs
x 64k iterations, the metric keys training logs; ``--layer-metrics`` adds one key per layer as
``log_layer_metrics = true`` does), and optionally a real study's store (``--tracking-uri`` and
``--study``, e.g. the one ``make depth-study`` wrote).

    python benchmarks/ui_load.py [--store DIR] [--iterations N] [--layer-metrics]
        [--tracking-uri URI --study NAME] [--idle S] [--csv PATH]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from bench_common import header, load, write_csv
from report_time import STUDY, build_store

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
START_TIMEOUT_S = 240
# The scroll: wheel steps of WHEEL_PX, each followed by STEP_WAIT_MS; the end is STILL_STEPS steps that do not move.
WHEEL_PX, STEP_WAIT_MS, STILL_STEPS = 800, 300, 3
SECTION = re.compile(r"^(.*?\S)\s*\((\d+)\)")  # a section header's text: "test (2) Add chart"
LONG_TASKS = """
window.__long = [];
new PerformanceObserver(list => { for (const e of list.getEntries()) window.__long.push([e.startTime, e.duration]); })
  .observe({type: 'longtask', buffered: true});
"""
# The chart area's scrolling element: the nearest ancestor of a section header that scrolls.
SCROLLER = """() => {
  let el = document.querySelector("[data-testid=experiment-view-compare-runs-section-header]");
  while (el && !(el.scrollHeight > el.clientHeight + 1 && /(auto|scroll)/.test(getComputedStyle(el).overflowY)))
    el = el.parentElement;
  return el ? [el.scrollTop, el.scrollHeight, el.clientHeight] : null;
}"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ui(study: str, uri: str) -> tuple[subprocess.Popen, str, float]:
    """``resnet-lab ui STUDY`` in a fresh process; its first line (the URL) and the seconds it took."""
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "resnet_lab.cli", "ui", study, "--tracking-uri", uri, "--port",
                             str(free_port())], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(START_TIMEOUT_S)
    if not line or not line[0].startswith("http"):
        proc.kill()
        sys.exit(f"ui_load: resnet-lab ui {study} printed no URL within {START_TIMEOUT_S} s")
    return proc, line[0].strip(), time.perf_counter() - t


def long_tasks(page: Any, since_ms: float = 0.0) -> tuple[int, float]:
    """Number and total seconds of the page's long tasks that started after ``since_ms``."""
    tasks = page.evaluate(f"window.__long.filter(t => t[0] >= {since_ms})")
    return len(tasks), sum(d for _, d in tasks) / 1000


def sections(page: Any) -> list[tuple[str, int]]:
    """(section name, its card count) from the headers, in page order."""
    out = []
    for text in page.get_by_test_id("experiment-view-compare-runs-section-header").all_inner_texts():
        if m := SECTION.match(" ".join(text.split())):
            out.append((m.group(1), int(m.group(2))))
    return out


def scroll_to_end(page: Any, timeout_s: float) -> float:
    """Wheel-scroll the chart area to its end; seconds until the last card's plot is in the page."""
    cards = page.get_by_test_id("experiment-view-compare-runs-card")
    page.mouse.move(900, 700)  # over the charts
    t, still = time.perf_counter(), 0
    last = None
    while still < STILL_STEPS and time.perf_counter() - t < timeout_s:
        page.mouse.wheel(0, WHEEL_PX)
        page.wait_for_timeout(STEP_WAIT_MS)
        pos = page.evaluate(SCROLLER)
        still = still + 1 if pos == last else 0
        last = pos
    cards.last.locator(".main-svg").first.wait_for(state="attached", timeout=timeout_s * 1000)
    return time.perf_counter() - t - STILL_STEPS * STEP_WAIT_MS / 1000  # less the steps that found the end


def measure(browser: Any, label: str, study: str, uri: str, idle_s: float, timeout_s: float,
            shots: Path | None) -> dict:
    proc, url, start_s = start_ui(study, uri)
    try:
        context = browser.new_context(viewport={"width": 1920, "height": 1080})
        context.set_default_timeout(timeout_s * 1000)
        context.add_init_script(LONG_TASKS)
        page = context.new_page()
        t = time.perf_counter()
        page.goto(url + "&compareRunsMode=CHART")
        page.get_by_test_id("experiment-view-compare-runs-card").locator(".main-svg").first.wait_for(state="attached")
        first_s = time.perf_counter() - t
        page.get_by_test_id("experiment-view-compare-runs-section-header").first.wait_for()
        found = sections(page)
        if shots:
            page.screenshot(path=str(shots / f"{label}_top.png"))
        scroll_s = scroll_to_end(page, timeout_s)
        n_load, busy_load = long_tasks(page)
        if shots:
            page.screenshot(path=str(shots / f"{label}_end.png"))
        idle = (0, 0.0)
        if idle_s > 0:
            now_ms = page.evaluate("performance.now()")
            page.wait_for_timeout(idle_s * 1000)
            idle = long_tasks(page, now_ms)
        context.close()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    return {"store": label, "ui_start_s": round(start_s, 1), "sections": len(found),
            "cards": sum(n for _, n in found), "section_names": "; ".join(f"{s} ({n})" for s, n in found),
            "first_chart_s": round(first_s, 1), "scroll_to_last_s": round(scroll_s, 1),
            "long_tasks": n_load, "long_tasks_s": round(busy_load, 1), "idle_s": idle_s,
            "idle_long_tasks": idle[0], "idle_long_tasks_s": round(idle[1], 2)}


def full_store(root: Path, iterations: int, layer_metrics: bool) -> str:
    """report_time.py's store in ``root``, built unless a complete one of the same kind is there."""
    done = root / "complete"
    kind = f"{iterations}{' layer-metrics' if layer_metrics else ''}"
    reusable = {kind} if layer_metrics else {kind, str(iterations)}  # report_time.py writes the bare count
    if done.is_file() and done.read_text().strip() in reusable:
        print(f"store: reusing {root}")
    else:
        if root.exists() and any(root.iterdir()):
            sys.exit(f"ui_load: --store {root} holds no complete store of {kind} iterations: pass an empty or new folder")
        print(f"store: building {root} (9 runs x {iterations:,} iterations{', per-layer keys' if layer_metrics else ''})",
              flush=True)
        build_store(root, iterations, layer_metrics)
        done.write_text(kind + "\n")
    return f"sqlite:///{root / 'mlflow.db'}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", type=Path, help="folder for the full-scale synthetic store (kept; reused when complete)")
    p.add_argument("--iterations", type=int, default=64000, help="iterations per run of that store (default 64000)")
    p.add_argument("--layer-metrics", action="store_true", help="build it with one metric key per layer too")
    p.add_argument("--tracking-uri", help="also measure this store's --study (e.g. sqlite:///mlflow.db)")
    p.add_argument("--study", help="the study to open in --tracking-uri (e.g. fashion_mnist)")
    p.add_argument("--idle", type=float, default=0.0, help="seconds to watch long tasks after scrolling (default 0)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds allowed for each page step (default 600)")
    p.add_argument("--screenshots", type=Path, help="folder for a screenshot of each store's top and end")
    p.add_argument("--csv", help="write the rows to this CSV")
    args = p.parse_args()
    if bool(args.tracking_uri) != bool(args.study):
        p.error("--tracking-uri and --study go together")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        p.error("needs the playwright Python package (pip install -e '.[test]'); never 'playwright install'")
    if not CHROMIUM.is_file():
        p.error(f"needs Chromium at {CHROMIUM} (sudo apt-get install chromium)")
    print(header([torch.device("cpu")]))
    if args.screenshots:
        args.screenshots.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ui_load_") as tmp, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        if args.study:
            rows.append(measure(browser, args.study, args.study, args.tracking_uri, args.idle, args.timeout,
                                args.screenshots))
        uri = full_store(args.store or Path(tmp) / "store", args.iterations, args.layer_metrics)
        label = f"{STUDY}-full{'-layer-metrics' if args.layer_metrics else ''}"
        rows.append(measure(browser, label, STUDY, uri, args.idle, args.timeout, args.screenshots))
        browser.close()
    cols = ["store", "ui_start_s", "sections", "cards", "first_chart_s", "scroll_to_last_s", "long_tasks_s",
            "idle_long_tasks_s"]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    for r in rows:
        print(f"{r['store']} sections: {r['section_names']}")
    print(f"{load()} at end")
    if args.csv:
        write_csv(args.csv, rows)


if __name__ == "__main__":
    main()

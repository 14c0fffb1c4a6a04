"""``resnet-lab ui`` (issue 14): bad input starts nothing; in a real browser the printed URL shows
the runs, not MLflow 3's GenAI overview; the report's images decode.

The browser tests drive the system Chromium (/usr/bin/chromium, Debian's ``chromium``) through
Playwright's Python package; no browser is downloaded. Without either they skip, naming what is
missing (CI sets RESNET_LAB_REQUIRE_BROWSER=1 and installs chromium, so there they fail instead).
Screenshots of each checked view are written to the test's tmp folder and printed, to look at.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from analysis.report import write_report
from resnet_lab.cli import main
from resnet_lab.study import run_study
from resnet_lab.tracking import EXPERIMENT_KIND_TAG, MODEL_TRAINING
from resnet_lab.ui import RUN_COLOR_TAG, RUNS_VIEW, VIEW_KEY, VIEW_TAG, chart_section, section_rank, share_study_view

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parent.parent
STUDY = "ui_study"
NETS = ("plain-8-s0", "resnet-8-s0")
STANDALONE = "resnet-8-s7"  # a `train` run without the study's tags
START_TIMEOUT_S = 240  # a cold MLflow server imports for 10-45 s on a busy 2-core machine
UI_TIMEOUT_MS = 60_000  # the UI's first render fetches a 5 MB bundle and the runs


def _study_file(folder: Path) -> Path:
    path = folder / f"{STUDY}.toml"
    path.write_text(f'name = "{STUDY}"\ndepths = [8]\n[train]\ndataset = "synthetic"\niterations = 20\n'
                    'batch_size = 32\nlog_every = 10\neval_every = 10\neval_batch_size = 256\n'
                    'checkpoint_every = 0\n[cpu]\n')
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ bad input: nothing started


def test_missing_store_is_one_line_and_creates_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    db = tmp_path / "none" / "mlflow.db"
    assert main(["ui", str(_study_file(tmp_path)), "--tracking-uri", f"sqlite:///{db}", "--port",
                 str(_free_port())]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no MLflow tracking store" in err and str(db) in err
    assert not db.parent.exists()


def test_study_never_run_is_one_line(tracking_uri: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    MlflowClient(tracking_uri).search_experiments()  # the store exists (the session's shared one)
    capsys.readouterr()  # MLflow's own log lines when it creates the store
    never = tmp_path / "never_run.toml"
    never.write_text('depths = [8]\n[cpu]\n')
    assert main(["ui", str(never), "--tracking-uri", tracking_uri, "--port", str(_free_port())]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'never_run' does not exist" in err and "run it first" in err
    assert MlflowClient(tracking_uri).get_experiment_by_name("never_run") is None


def test_port_in_use_is_one_line(tracking_uri: str, capsys: pytest.CaptureFixture) -> None:
    MlflowClient(tracking_uri).search_experiments()
    capsys.readouterr()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["ui", "--tracking-uri", tracking_uri, "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"127.0.0.1:{port}" in err and "--port" in err


def test_the_view_orders_error_charts_first_and_colours_by_net() -> None:
    """Chart sections: train, test, val, final first, then the rest by name, MLflow's catch-alls last;
    within a section the error before the loss. Nets of one arch get different colours, plain and
    residual nets never share one, a net's seeds share it."""
    keys = ["diag/lesion/baseline_error", "final/test_error", "final/train_error", "lr", "perf/images_per_s",
            "system/cpu_utilization_percentage", "test/error", "test/loss", "train/error", "train/loss",
            "z_probes/grad_norm/total"]
    from resnet_lab.ui import net_colors, study_view

    view = study_view(keys)
    sections = [s["name"] for s in view["compareRunSections"]]
    assert sections == ["train", "test", "final", "diag/lesion", "perf", "z_probes/grad_norm", "Model metrics",
                        "System metrics"]
    assert sorted(sections, key=section_rank) == sections and chart_section("lr") == "Model metrics"
    charts = [(c["metricKey"], c["type"]) for c in view["compareRunCharts"]]
    assert charts[:4] == [("train/error", "LINE"), ("train/loss", "LINE"), ("test/error", "LINE"), ("test/loss", "LINE")]
    assert ("diag/lesion/baseline_error", "BAR") in charts and ("final/train_error", "BAR") in charts
    assert view["selectedColumns"][:2] == ["metrics.`final/train_error`", "metrics.`final/test_error`"]
    assert view["groupBy"]["groupByKeys"] == [{"mode": "param", "groupByData": "model"}]
    colors = net_colors(["plain-8", "plain-20", "plain-56", "resnet-8", "resnet-20", "resnet-56", "resnet-110"])
    assert len(set(colors.values())) == len(colors)


def test_the_view_shows_every_training_run_and_marks_the_experiment(study: dict) -> None:
    """The shared view's search matches the study's training runs and a standalone `train` run in the
    same experiment, not the study's parent; the experiment is tagged model training; every run gets
    its net's colour."""
    client = MlflowClient(study["uri"])
    share_study_view(client, study["experiment_id"])
    exp = client.get_experiment(study["experiment_id"])
    assert exp.tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING
    view = json.loads(exp.tags[VIEW_TAG])
    shown = {r.info.run_name for r in client.search_runs([study["experiment_id"]], view["searchFilter"])}
    assert shown == {*NETS, STANDALONE}  # the parent (named after the study) is not among them
    colors = {r.info.run_name: r.data.tags[RUN_COLOR_TAG] for r in client.search_runs([study["experiment_id"]],
                                                                                      view["searchFilter"])}
    assert colors[STANDALONE] == colors["resnet-8-s0"] != colors["plain-8-s0"]


# ------------------------------------------------------------------ the real browser


def _require_browser() -> Any:
    """Playwright's sync API, or skip (fail in CI) saying what is missing."""
    missing = []
    if not CHROMIUM.is_file():
        missing.append(f"no Chromium at {CHROMIUM} (sudo apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
        missing.append("no playwright Python package (pip install -e '.[test]'; never 'playwright install')")
    if missing:
        if os.environ.get("RESNET_LAB_REQUIRE_BROWSER"):
            pytest.fail("; ".join(missing))
        pytest.skip("real-browser test: " + "; ".join(missing))
    return sync_playwright


@pytest.fixture(scope="module")
def sync_playwright() -> Any:
    return _require_browser()


@pytest.fixture(scope="module")
def study(sync_playwright: Any, tracking_uri: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 2-net synthetic study (plain-8, resnet-8; 20 iterations), run by the study runner."""
    folder = tmp_path_factory.mktemp("ui_study")
    path = _study_file(folder)
    result = run_study(path, tracking_uri=tracking_uri, progress=False)
    assert result is not None and not result.failed
    # a standalone `train` into the study's experiment (no study tags), and a diagnostic's bar metric
    assert main(["train", "--model", "resnet-8", "--dataset", "synthetic", "--iterations", "20", "--seed", "7",
                 "--set", "batch_size=32", "--set", "log_every=10", "--set", "eval_every=10",
                 "--set", "checkpoint_every=0", "--no-progress", "--tracking-uri", tracking_uri,
                 "--experiment", STUDY]) == 0
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(STUDY)
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    client.log_metric(runs["plain-8-s0"].info.run_id, "diag/lesion/baseline_error", 50.0, step=0)
    return {"path": path, "uri": tracking_uri, "experiment_id": exp.experiment_id, "folder": folder, "runs": runs}


class Booting:
    """``resnet-lab ui`` started, its two lines read on a thread: tests that need the URL wait for it
    (``lines``), so the server boots (10-15 s) while tests that do not need it run."""

    def __init__(self, study: dict) -> None:
        self.study, self.port = study, _free_port()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen([sys.executable, "-m", "resnet_lab.cli", "ui", str(study["path"]),
                                      "--tracking-uri", study["uri"], "--port", str(self.port)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                     cwd=study["folder"])
        self._lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self._lines.extend(
            [self.proc.stdout.readline(), self.proc.stdout.readline()]))
        self._reader.start()

    @property
    def lines(self) -> list[str]:
        self._reader.join(START_TIMEOUT_S)
        assert len(self._lines) == 2 and self._lines[0].startswith("http"), \
            f"no URL after {START_TIMEOUT_S} s: {self.proc.poll()=}"
        return [ln.rstrip("\n") for ln in self._lines]


@pytest.fixture(scope="module")
def server(study: dict) -> Iterator[Booting]:
    """``resnet-lab ui`` on the study, as a user starts it; stopped with SIGINT (Ctrl-C) afterwards."""
    booting = Booting(study)
    try:
        yield booting
    finally:
        booting.proc.send_signal(signal.SIGINT)
        code = booting.proc.wait(30)
        stderr = booting.proc.stderr.read()
    assert code == 0, stderr
    assert "stopping the MLflow server" in stderr
    with socket.socket() as s:  # nothing listens there any more (the browser's closed connections may linger)
        assert s.connect_ex(("127.0.0.1", booting.port)) != 0


@pytest.fixture(scope="module")
def browser(sync_playwright: Any) -> Iterator[Any]:
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh profile each time: a new user, whose browser has no remembered "Model training" toggle."""
    # A common desktop screen: at 1600 px the picked column sits right of the grid's visible
    # part, beside MLflow's Assistant panel (open by default), until one scrolls sideways.
    context = browser.new_context(viewport={"width": 1920, "height": 1080})
    context.set_default_timeout(UI_TIMEOUT_MS)
    yield context.new_page()
    context.close()


def _shot(page: Any, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path))
    print(f"screenshot: {path}")


def test_report_images_all_decode(study: dict, server: Booting, page: Any, tmp_path: Path) -> None:
    """Every image of report.html decodes. First of the browser tests and given ``server`` only to
    start it: MLflow's server boots while the report is written."""
    md = write_report(STUDY, tracking_uri=study["uri"], out_dir=tmp_path / "reports", log_to_mlflow=False)
    page.goto(md.with_suffix(".html").as_uri())
    page.wait_for_load_state("load")
    widths = page.locator("img").evaluate_all("imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
    assert widths and all(w > 0 for w in widths), widths
    page.locator("img").first.scroll_into_view_if_needed()
    _shot(page, tmp_path, "report")


def test_prints_the_runs_view_url_first(server: Booting) -> None:
    url, hint = server.lines
    assert url == (f"http://127.0.0.1:{server.port}/#/experiments/{server.study['experiment_id']}/runs?{RUNS_VIEW}"
                   f"&viewStateShareKey={VIEW_KEY}")
    assert '"Model training"' in hint


def test_url_opens_the_runs_by_net_with_their_errors(server: Booting, page: Any, tmp_path: Path) -> None:
    """No click: the printed URL opens the runs view (not the GenAI overview) on the study's shared
    view: every training run listed, the standalone `train` one too (the parent filtered out, so
    none is folded), grouped by net, final train error left of final test error."""
    page.goto(server.lines[0])
    for name in (*NETS, STANDALONE):
        page.locator(".ag-cell a", has_text=name).wait_for()
    assert "genai" not in page.url and "/overview" not in page.url  # not the GenAI overview (the default)
    assert page.get_by_role("heading", name="Runs").is_visible()
    for net in ("plain-8", "resnet-8"):  # a group row per net; resnet-8 holds the study's seed 0 and the standalone seed 7
        page.locator(".ag-cell", has_text=f"Group: {net}").first.wait_for()
    from playwright.sync_api import expect

    train_col, test_col = (page.locator(f".ag-header-cell[col-id='metrics.`final/{s}_error`']").first.bounding_box()
                           for s in ("train", "test"))
    assert train_col["x"] < test_col["x"]
    client = MlflowClient(server.study["uri"])
    for name in NETS:
        run_id = server.study["runs"][name].info.run_id
        metrics = client.get_run(run_id).data.metrics
        stored = metrics["final/test_error"]
        assert stored == metrics["test/error"]  # the last test-error point
        # ag-grid draws a row in parts (pinned, centre) that share its row-index
        index = page.locator("[role=row]", has=page.locator("a", has_text=name)).first.get_attribute("row-index")
        cell = page.locator(f"[role=row][row-index='{index}'] [col-id='metrics.`final/test_error`']")
        expect(cell).to_be_in_viewport()  # seen, not only in the page
        assert float(cell.inner_text()) == pytest.approx(stored, abs=0.01), (name, cell.inner_text(), stored)
    _shot(page, tmp_path, "runs_by_net")


def test_chart_view_reads_by_net_with_the_error_curves_first(server: Booting, page: Any, tmp_path: Path) -> None:
    """The chart view opens on the train and test error curves (the diagnostics' bars after the final
    errors), each net drawn once (its seeds' mean and band), named by net in the legend."""
    import re

    from playwright.sync_api import expect

    page.goto(server.lines[0] + "&compareRunsMode=CHART")
    page.locator(".ag-cell", has_text="Group: plain-8").first.wait_for()
    headers = page.get_by_test_id("experiment-view-compare-runs-section-header")
    headers.first.wait_for()
    names = [re.match(r"\s*(.*?\S)\s*\(\d+\)", t).group(1) for t in headers.all_inner_texts()]
    assert names[:2] == ["train", "test"] and names.index("final") < names.index("diag/lesion"), names
    card = page.get_by_test_id("experiment-view-compare-runs-card").filter(has=page.locator("h4[title='train/error']"))
    expect(card.locator("h4[title='train/error']")).to_be_in_viewport()  # first on the page, no scrolling
    card.locator(".scatterlayer path.js-line").nth(1).wait_for()
    legend = card.inner_text()
    assert "plain-8 (train/error)" in legend and "resnet-8 (train/error)" in legend, legend
    _shot(page, tmp_path, "charts_by_net")
    page.get_by_placeholder("Search metric charts").fill("test/error")
    card = page.get_by_test_id("experiment-view-compare-runs-card").filter(
        has=page.locator("h4[title='test/error']"))
    card.locator(".scatterlayer path.js-line").nth(1).wait_for()  # a line per net
    expect(card.locator("h4[title='test/error']")).to_be_in_viewport()
    _shot(page, tmp_path, "chart_test_error")


def _model_training(page: Any) -> bool:
    """MLflow's sidebar in its Model-training mode lists the model registry; in GenAI mode it lists
    evaluation runs and judges instead."""
    return page.get_by_text("Model registry").count() > 0 and page.get_by_text("Evaluation runs").count() == 0


def test_run_pages_stay_on_model_training_once_the_browser_remembers_it(server: Booting, page: Any, tmp_path: Path) -> None:
    """Into a run and back to the experiment. The experiment carries MLflow's model-training tag, but
    MLflow 3.17's own UI chooses its mode per browser (the URL's workflowType, else the toggle the
    browser remembers, GenAI for a new one): this test pins down what the printed hint tells a user."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    exp = MlflowClient(server.study["uri"]).get_experiment(server.study["experiment_id"])
    assert exp.tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING
    run = page.locator(".ag-cell a", has_text=NETS[0])
    page.goto(server.lines[0])
    run.wait_for()
    run.click()
    page.get_by_role("heading", name=NETS[0]).wait_for()
    new_browser_run_page = _model_training(page)  # a new browser: MLflow 3.17 shows the run in GenAI mode
    _shot(page, tmp_path, "run_page_new_browser")
    page.go_back()  # the browser's Back keeps the URL's workflowType
    run.wait_for()
    assert _model_training(page) and "/overview" not in page.url
    # the hint's remedy: GenAI, then Model training, once; the browser remembers the second
    page.get_by_text("GenAI", exact=True).first.click()
    try:
        page.get_by_role("button", name="Got it").click(timeout=15_000)  # GenAI's first-visit pop-up
    except PlaywrightTimeout:
        pass
    page.get_by_text("Model training", exact=True).first.click()
    page.goto(server.lines[0])
    run.wait_for()
    run.click()
    page.get_by_role("heading", name=NETS[0]).wait_for()
    assert _model_training(page)
    _shot(page, tmp_path, "run_page_remembered")
    page.get_by_role("link", name="Runs", exact=True).first.click()  # the breadcrumb "ui_study > Runs" back
    page.get_by_role("heading", name="Runs").wait_for()
    assert _model_training(page) and "/overview" not in page.url
    _shot(page, tmp_path, "back_to_the_experiment")
    assert not new_browser_run_page, "MLflow now keeps a new browser's run page on Model training: update ui.HINT"

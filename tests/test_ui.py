"""``resnet-lab ui`` (issue 14): bad input starts nothing; in a real browser the printed URL shows
the runs, not MLflow 3's GenAI overview; the report's images decode.

The browser tests drive the system Chromium (/usr/bin/chromium, Debian's ``chromium``) through
Playwright's Python package; no browser is downloaded. Without either they skip, naming what is
missing (CI sets RESNET_LAB_REQUIRE_BROWSER=1 and installs chromium, so there they fail instead).
Screenshots of each checked view are written to the test's tmp folder and printed, to look at.
"""

from __future__ import annotations

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
from resnet_lab.ui import RUNS_VIEW, VIEW_KEY

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parent.parent
STUDY = "ui_study"
NETS = ("plain-8-s0", "resnet-8-s0")
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
    assert err.count("\n") == 1 and "no MLflow store" in err and str(db) in err
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
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(STUDY)
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
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


def test_url_opens_the_runs_with_their_test_error(server: Booting, page: Any, tmp_path: Path) -> None:
    """No click: the printed URL opens the runs view (not the GenAI overview) on the study's shared
    view, every training run listed (the parent filtered out, so none is folded) with its final
    test error as a column."""
    page.goto(server.lines[0])
    for name in NETS:
        page.locator(".ag-cell a", has_text=name).wait_for()
    assert "genai" not in page.url and "/overview" not in page.url  # not the GenAI overview (the default)
    assert page.get_by_role("heading", name="Runs").is_visible()
    from playwright.sync_api import expect

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
    _shot(page, tmp_path, "runs_with_test_error")


def test_chart_view_shows_the_test_error_chart(server: Booting, page: Any, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    page.goto(server.lines[0] + "&compareRunsMode=CHART")
    for name in NETS:  # charts draw the listed runs: the shared view lists the training runs
        page.locator(".ag-cell a", has_text=name).wait_for()
    page.get_by_placeholder("Search metric charts").fill("test/error")
    card = page.get_by_test_id("experiment-view-compare-runs-card").filter(
        has=page.locator("h4[title='test/error']"))
    # drawn, a line per child run (the card's legend, cut by its height, need not name them all)
    card.locator(".scatterlayer path.js-line").nth(len(NETS) - 1).wait_for()
    expect(card.locator("h4[title='test/error']")).to_be_in_viewport()
    _shot(page, tmp_path, "chart_test_error")

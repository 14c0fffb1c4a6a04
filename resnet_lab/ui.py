"""``resnet-lab ui``: the MLflow UI on a study's store, opened on the study's runs, read by net.

Why not plain ``mlflow ui``: since MLflow 3 an experiment opens on a GenAI "traces" overview
(every panel "No data") unless this browser once picked the "Model training" toggle; the URL
parameter ``workflowType=machine_learning`` opens the runs view directly. (MLflow 3.17's UI
chooses that mode per browser; the experiment tag ``mlflow.experimentKind``, which the lab sets,
is read only where MLflow's per-experiment switch is on, so a new browser shows a run's page in
GenAI mode: the printed hint says how to make the browser remember.) This command checks the
store and the study first (so a typo starts no server and creates no empty store), stores the
study's view (``study_view``: MLflow's shared view state, one experiment tag), starts MLflow's own
server, waits until it answers and prints that URL as its first line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import UserError
from .studyname import study_name
from .tracking import (connect, display_uri, is_server, mark_model_training, require_store, resolve_tracking_uri,
                       search_all_runs)

RUNS_VIEW = "workflowType=machine_learning"  # MLflow 3's query parameter for the classic runs view
# MLflow's shared view state: the URL parameter viewStateShareKey=KEY makes the runs view take its
# search, sort and columns from the experiment tag mlflow.sharedViewState.KEY (a JSON object).
VIEW_KEY = "resnet-lab"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
TRAINING_RUNS = "tags.model IS NOT NULL"  # every run that trained a net (study or standalone); not a study's parent
SECTION_ORDER = ("train", "test", "val", "final")  # chart sections first in the view, in this order
SUMMARY_PREFIXES = ("final/", "diag/", "study/")  # logged once, at step 0: a bar per run, not a curve
MODEL_METRICS, SYSTEM_METRICS = "Model metrics", "System metrics"  # MLflow's sections for keys without a prefix, system/*
RUN_COLOR_TAG = "mlflow.runColor"  # the run tag MLflow's UI reads for a run's colour (and writes when a user picks one)
PLAIN_COLORS = ("#f2a65a", "#e8743b", "#d1495b", "#a4243b", "#6b0f1a")  # light to dark, by depth
RESNET_COLORS = ("#7cc4e8", "#2a9df4", "#1768ac", "#2e8b57", "#0b3d20")
PORTS = range(1, 65536)
READY_TIMEOUT_S = 180.0  # a cold MLflow server imports for 10-40 s on a busy 2-core machine
STOP_TIMEOUT_S = 10.0
ACCESS_OK = re.compile(r'" [23]\d\d ')  # uvicorn's access-log line of a request that succeeded: not echoed
HINT = ("MLflow 3.17's UI picks \"Model training\" or \"GenAI\" per browser, not per experiment: this URL opens "
        "the training runs grouped by net, but a run's page opens in GenAI mode until this browser has once "
        "clicked GenAI, then Model training, in the sidebar (it remembers that). Clear the search box for the "
        "study's parent run and its report; Ctrl-C stops the server")


def runs_url(base: str, experiment_id: str | None) -> str:
    """The experiment's runs view in the study's shared view (``study_view``), or the experiment
    list when no experiment is given."""
    if experiment_id is None:
        return f"{base}/#/experiments"
    return f"{base}/#/experiments/{experiment_id}/runs?{RUNS_VIEW}&viewStateShareKey={VIEW_KEY}"


def study_view(metric_keys: Iterable[str]) -> dict[str, Any]:
    """The runs view a study opens on, without a click, read by net.

    Table: every training run the lab made (study or standalone ``train``: each has a ``model``
    tag, the study's parent run has none, so nothing is folded under it), grouped by the ``model``
    param (a row per net, its seeds inside), with final train error before test error, arch,
    depth and seed as columns (MLflow shows no metric column unprompted). Charts: one card per
    metric key as MLflow would draw it, but the sections in the order a reader needs them (the
    error curves first, diagnostics and probes after: ``section_rank``), each net drawn as its
    seeds' mean with a min/max band, and every run drawn (MLflow draws the first 10 by default).
    """
    keys = sorted(set(metric_keys))
    finals = [f"final/{s}_error" for s in ("train", "test", "val") if f"final/{s}_error" in keys]
    columns = [f"metrics.`{m}`" for m in finals] + ["params.`arch`", "params.`depth`", "tags.`seed`"]
    sections = sorted({chart_section(k) for k in keys}, key=section_rank)
    charts = [{"uuid": f"resnet-lab-{key}", "type": "BAR" if key.startswith(SUMMARY_PREFIXES) else "LINE",
               "metricKey": key, "metricSectionId": f"resnet-lab-section-{section}",
               "isGenerated": True, "deleted": False, "runsCountToCompare": 100}
              for section in sections
              for key in sorted((k for k in keys if chart_section(k) == section), key=lambda k: ("error" not in k, k))]
    return {"searchFilter": TRAINING_RUNS, "orderByKey": "tags.`mlflow.runName`", "orderByAsc": True,
            "selectedColumns": columns, "columnOrder": columns, "runsHiddenMode": "SHOW_ALL",
            "groupBy": {"aggregateFunction": "average", "groupByKeys": [{"mode": "param", "groupByData": "model"}]},
            "useGroupedValuesInCharts": True, "hideEmptyCharts": True,
            "compareRunSections": [{"uuid": f"resnet-lab-section-{name}", "name": name, "display": True,
                                    "isReordered": True} for name in sections],
            "compareRunCharts": charts, "isAccordionReordered": True}


def chart_section(metric_key: str) -> str:
    """The chart section MLflow files a metric key under: the key up to its last '/'; keys
    without one go to "Model metrics", ``system/*`` to "System metrics"."""
    section = metric_key.rpartition("/")[0]
    return MODEL_METRICS if not section else SYSTEM_METRICS if section == "system" else section


def section_rank(section: str) -> tuple[int, str]:
    """Errors first (train, test, val, then the final values), the rest by name, MLflow's two
    catch-all sections last."""
    head = section.split("/")[0]
    last = {MODEL_METRICS: 1, SYSTEM_METRICS: 2}.get(section, 0)
    return (SECTION_ORDER.index(head) if head in SECTION_ORDER else len(SECTION_ORDER) + last, section)


def net_colors(models: Iterable[str]) -> dict[str, str]:
    """A colour per net, the same for its seeds: plain nets in reds and oranges, residual nets in
    blues and greens, deeper nets darker, so that plain-n and ResNet-n never share a colour."""
    out, models = {}, set(models)
    for arch, palette in (("plain", PLAIN_COLORS), ("resnet", RESNET_COLORS)):
        nets = sorted((m for m in models if m.startswith(f"{arch}-")), key=_depth_of)
        for i, net in enumerate(nets):
            spread = i * (len(palette) - 1) // max(len(nets) - 1, 1)  # few nets: far apart in the palette
            out[net] = palette[spread] if len(nets) <= len(palette) else palette[i % len(palette)]
    return out


def _depth_of(model: str) -> tuple[int, str]:
    tail = model.rpartition("-")[2]
    return (int(tail), model) if tail.isdigit() else (0, model)


def share_study_view(client: Any, experiment_id: str) -> None:
    """Store ``study_view`` as the experiment's shared view (one experiment tag, rewritten each
    time, so it follows the lab's version and the metrics logged since), mark the experiment as
    model training, and colour each training run by its net (MLflow's ``mlflow.runColor`` run
    tag; by default MLflow picks colours by run id, and different nets often share one). The
    user's own saved view is left alone."""
    runs = search_all_runs(client, experiment_id, TRAINING_RUNS)
    colors = net_colors(r.data.tags["model"] for r in runs)
    for r in runs:
        color = colors.get(r.data.tags["model"])
        if color and r.data.tags.get(RUN_COLOR_TAG) != color:
            client.set_tag(r.info.run_id, RUN_COLOR_TAG, color)
    keys = {k for r in runs for k in r.data.metrics}
    client.set_experiment_tag(experiment_id, VIEW_TAG, json.dumps(study_view(keys)))
    mark_model_training(client, client.get_experiment(experiment_id))


def study_experiment(client: Any, uri: str, study: str) -> str:
    """The id of the study's experiment; a study that was never run (no experiment, no runs) is a UserError."""
    exp = client.get_experiment_by_name(study)
    where = f"in the MLflow store {display_uri(uri)}"
    if exp is None or exp.lifecycle_stage != "active":
        names = sorted(e.name for e in client.search_experiments(max_results=50))
        there = f" (experiments there: {', '.join(names[:12])})" if names else ""
        state = "is deleted" if exp is not None else "does not exist"
        raise UserError(f"study {study!r} {state} {where}{there}: run it first "
                        f"('resnet-lab study FILE'), or pass --tracking-uri")
    if not client.search_runs([exp.experiment_id], max_results=1):
        raise UserError(f"study {study!r} has no runs {where}: run it first ('resnet-lab study FILE')")
    return exp.experiment_id


def check_port_free(host: str, port: int) -> None:
    """Fail in one line, before the server starts, when something already listens on ``port``."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no obstacle
            s.bind((host, port))
    except OSError as e:
        raise UserError(f"cannot serve on {host}:{port}: {e.strerror or e} "
                        "(another server there? pass --port N, e.g. --port 5001)") from None


def server_command(uri: str, host: str, port: int) -> list[str]:
    """``mlflow server`` from this interpreter's environment (the venv's bin), one worker.

    One worker: a local UI for one person; each extra uvicorn worker imports MLflow again
    (seconds of CPU each). Artifacts are read where each run's artifact URI points (the
    store's ``mlartifacts/``), which the server serves to the UI's artifact viewer.
    """
    mlflow = Path(sys.executable).parent / "mlflow"
    head = [str(mlflow)] if mlflow.is_file() else [sys.executable, "-m", "mlflow"]
    return head + ["server", "--backend-store-uri", uri, "--host", host, "--port", str(port), "--workers", "1"]


class Server:
    """The MLflow server as a child process in its own process group, its output kept until ready."""

    def __init__(self, cmd: list[str]) -> None:
        # No job runner: it serves GenAI jobs (online scoring, trace archival) this project has none
        # of, and is one more process to start and to stop.
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                     start_new_session=True)  # Ctrl-C reaches us; we stop the group
        self.lines: deque[str] = deque(maxlen=40)
        self.echo = False  # once ready, the server's messages go to stderr
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())
            if self.echo and not ACCESS_OK.search(line):
                print(line, end="", file=sys.stderr)

    def wait_ready(self, url: str, timeout: float) -> None:
        """Poll ``url`` (the server's /health) until it answers 200; the server's last words if it dies."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                last = next((ln for ln in reversed(self.lines) if ln.strip()), "no output")
                raise UserError(f"the MLflow server exited with status {self.proc.returncode}: {last.strip()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as reply:
                    if reply.status == 200:
                        self.echo = True
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        raise UserError(f"the MLflow server did not answer {url} within {timeout:.0f} s")

    def stop(self) -> None:
        """SIGTERM to ``mlflow server``, which passes it on to uvicorn for a graceful stop (a few
        seconds); whatever of its group is left after STOP_TIMEOUT_S is killed. (Signalling the
        whole group instead interrupts uvicorn twice, which it answers with a traceback.)"""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # the usual case: the group is gone
        self.proc.wait()


def _interrupt(signum: int, frame: Any) -> None:
    """SIGINT and SIGTERM stop the server the same way (set explicitly: a shell's background job
    starts with SIGINT ignored, and Python's default for SIGTERM skips the cleanup)."""
    raise KeyboardInterrupt


def serve(uri: str, host: str, port: int, experiment_id: str | None) -> int:
    """Start the server (the caller has checked the port), print the URL, block until Ctrl-C
    (exit 0) or the server dies (exit 1)."""
    base = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    server = None
    try:
        server = Server(server_command(uri, host, port))
        server.wait_ready(f"{base}/health", READY_TIMEOUT_S)
        print(runs_url(base, experiment_id), flush=True)
        print(HINT, flush=True)
        status = server.proc.wait()
        print(f"resnet-lab ui: the MLflow server exited with status {status}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("resnet-lab ui: stopping the MLflow server", file=sys.stderr)
        return 0
    finally:
        if server is not None:
            server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def cmd_ui(args: argparse.Namespace) -> int:
    uri = resolve_tracking_uri(args.tracking_uri)
    if is_server(uri):
        raise UserError(f"{display_uri(uri)} is a tracking server: its UI is already there; "
                        "'resnet-lab ui' serves a local store (sqlite:///...)")
    require_store(uri)
    experiment_id = None
    if args.study:
        client = connect(uri)
        experiment_id = study_experiment(client, uri, study_name(args.study))
    check_port_free(args.host, args.port)  # before the view is written to the store
    if experiment_id is not None:
        share_study_view(client, experiment_id)
    return serve(uri, args.host, args.port, experiment_id)


def port_number(text: str) -> int:
    """``--port``: a TCP port, 1-65535 (a socket would raise OverflowError past it)."""
    try:
        port = int(text)
    except ValueError:
        port = None
    if port not in PORTS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port: give a number from 1 to 65535, e.g. 5001")
    return port


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``ui`` on the ``resnet-lab`` subparsers."""
    p = sub.add_parser("ui", help="start the MLflow UI on a study's store and print the URL of its runs",
                       description="Start MLflow's server on the study's store and print, as the first line, "
                                   "the URL of the study's runs view. Ctrl-C stops it.")
    p.add_argument("study", nargs="?", metavar="STUDY_FILE",
                   help="study TOML file, study name or experiment name (e.g. resnet_lab, where 'train' logs by "
                        "default); default: print the experiment list's URL")
    p.add_argument("--port", type=port_number, default=5000, help="port to serve on, 1-65535 (default 5000)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    p.set_defaults(func=cmd_ui)
    return p

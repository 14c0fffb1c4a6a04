"""``resnet-lab ui``: the MLflow UI on a study's store, opened on the study's runs.

Why not plain ``mlflow ui``: since MLflow 3 an experiment opens on a GenAI "traces" overview
(every panel "No data") unless this browser once picked the "Model training" toggle; the URL
parameter ``workflowType=machine_learning`` opens the runs view directly. This command checks
the store and the study first (so a typo starts no server and creates no empty store), stores
the study's view (its training runs with their final errors as columns: MLflow's shared view
state, one experiment tag), starts MLflow's own server, waits until it answers and prints that
URL as its first line.
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
from pathlib import Path
from typing import Any

from .errors import UserError
from .tracking import connect, display_uri, resolve_tracking_uri

RUNS_VIEW = "workflowType=machine_learning"  # MLflow 3's query parameter for the classic runs view
# MLflow's shared view state: the URL parameter viewStateShareKey=KEY makes the runs view take its
# search, sort and columns from the experiment tag mlflow.sharedViewState.KEY (a JSON object).
VIEW_KEY = "resnet-lab"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
READY_TIMEOUT_S = 180.0  # a cold MLflow server imports for 10-40 s on a busy 2-core machine
STOP_TIMEOUT_S = 10.0
ACCESS_OK = re.compile(r'" [23]\d\d ')  # uvicorn's access-log line of a request that succeeded: not echoed
HINT = ('the browser remembers the "Model training" / "GenAI" toggle: without ?' + RUNS_VIEW +
        ", MLflow may open an experiment on its GenAI overview; the URL lists the training runs "
        "(clear the search box for the study's parent run and its report; Ctrl-C stops the server)")


def runs_url(base: str, experiment_id: str | None) -> str:
    """The experiment's runs view in the study's shared view (``study_view``), or the experiment
    list when no experiment is given."""
    if experiment_id is None:
        return f"{base}/#/experiments"
    return f"{base}/#/experiments/{experiment_id}/runs?{RUNS_VIEW}&viewStateShareKey={VIEW_KEY}"


def study_view(has_val: bool) -> dict[str, Any]:
    """The runs table a study opens on, without a click: its training runs (the parent left out,
    so no run is folded under it), each net's seeds together (sorted by run name), and the final
    errors, arch, depth and seed as columns (MLflow shows no metric column unprompted), and every
    run drawn in the charts (MLflow draws the first 10 by default: 2 of the default study's 12
    runs, and 40 of a full ``cifar10_paper`` study's 50, would be missing from every chart)."""
    metrics = ["final/train_error", "final/test_error"] + (["final/val_error"] if has_val else [])
    columns = ([f"metrics.`{m}`" for m in metrics] + ["params.`arch`", "params.`depth`", "tags.`seed`"])
    return {"searchFilter": "tags.kind = 'train'", "orderByKey": "tags.`mlflow.runName`", "orderByAsc": True,
            "selectedColumns": columns, "runsHiddenMode": "SHOW_ALL"}


def share_study_view(client: Any, experiment_id: str) -> None:
    """Store ``study_view`` as the experiment's shared view (one experiment tag, rewritten each
    time, so it follows the lab's version); the user's own saved view is left alone."""
    runs = client.search_runs([experiment_id], "tags.kind = 'train'", max_results=1)
    has_val = bool(runs) and "final/val_error" in runs[0].data.metrics
    client.set_experiment_tag(experiment_id, VIEW_TAG, json.dumps(study_view(has_val)))


def check_store(uri: str) -> None:
    """The store must already exist: MLflow would silently create an empty SQLite file or folder."""
    if uri.startswith("sqlite:"):
        name = uri.split("://", 1)[-1].split("?", 1)[0]
        path = Path(name[1:] if name.startswith("/") else name)  # sqlite:///rel.db, sqlite:////abs.db
        if not path.is_file():
            raise UserError(f"no MLflow store at {path} ({uri}): run a study first ('make depth-study'), "
                            "or pass --tracking-uri / set MLFLOW_TRACKING_URI")
    elif uri.startswith("file:") or "://" not in uri:
        path = Path(uri.removeprefix("file://").removeprefix("file:"))
        if not path.is_dir():
            raise UserError(f"no MLflow store at {path} ({uri}): run a study first, or pass --tracking-uri")


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
    from analysis.report import study_name  # the report's rule: a study name, or its TOML's name / stem

    uri = resolve_tracking_uri(args.tracking_uri)
    if uri.startswith(("http://", "https://")):
        raise UserError(f"{display_uri(uri)} is a tracking server: its UI is already there; "
                        "'resnet-lab ui' serves a local store (sqlite:///...)")
    check_store(uri)
    experiment_id = None
    if args.study:
        client = connect(uri)
        experiment_id = study_experiment(client, uri, study_name(args.study))
    check_port_free(args.host, args.port)  # before the view is written to the store
    if experiment_id is not None:
        share_study_view(client, experiment_id)
    return serve(uri, args.host, args.port, experiment_id)


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``ui`` on the ``resnet-lab`` subparsers."""
    p = sub.add_parser("ui", help="start the MLflow UI on a study's store and print the URL of its runs",
                       description="Start MLflow's server on the study's store and print, as the first line, "
                                   "the URL of the study's runs view. Ctrl-C stops it.")
    p.add_argument("study", nargs="?", metavar="STUDY_FILE",
                   help="study TOML file or study name (default: print the experiment list's URL)")
    p.add_argument("--port", type=int, default=5000, help="port to serve on (default 5000)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    p.set_defaults(func=cmd_ui)
    return p

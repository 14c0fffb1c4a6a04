"""MLflow, through its own client API: one run per training, metrics in batched background writes.

Why a thin class instead of ``mlflow.start_run``: the fluent API keeps a global active-run
stack, which gets in the way when a study trains several nets in one process, and it makes
it easy to log one metric per call. Here every log interval is a single ``log_batch`` call
(split at MLflow's 1000-metric limit), written by a background thread so training never
waits on the store, and kept until written, so a tracking server that restarts mid-run
loses nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from .errors import UserError, check_can_create

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
MAX_METRICS_PER_BATCH = 1000  # MLflow's limit for one log_batch call
MAX_PARAMS_PER_BATCH = 100
PROBE_TIMEOUT_S = 5.0  # one TCP connect to a tracking server before anything else
TRACKING_PATIENCE_S = 600.0  # how long blocking calls wait for a store that went away
RETRY_FIRST_S, RETRY_MAX_S = 0.5, 10.0  # backoff between attempts: 0.5, 1, 2, ... 10, 10 s

_log = logging.getLogger(__name__)
T = TypeVar("T")

Point = tuple[str, float, int]  # (metric name, value, step)
# Logged params that say where things live, where runs are logged, how fast or how visibly a run
# goes: not what is trained. Left out of TrainConfig.config_hash and of the report's configuration
# table. Here rather than in config so that the report reads it without importing torch (~3 s).
NOT_TRAINING = ("data_dir", "data_root", "device", "compile", "compile_mode", "tracking_uri", "experiment", "progress",
                "checkpoint_dir", "checkpoint_every", "eval_batch_size", "log_layer_metrics")


# ---------------------------------------------------------------- tracking URIs (the one place they are parsed)

def resolve_tracking_uri(uri: str | None = None) -> str:
    """``--tracking-uri`` > ``MLFLOW_TRACKING_URI`` > ``sqlite:///mlflow.db`` in the working dir."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def is_sqlite(uri: str) -> bool:
    return uri.startswith("sqlite:")


def sqlite_path(uri: str) -> Path | None:
    """The database file of a SQLite URI (``sqlite:///rel.db`` -> ``rel.db``, ``sqlite:////abs.db`` ->
    ``/abs.db``, any ``?query`` dropped); None for other stores and in-memory databases."""
    if not is_sqlite(uri):
        return None
    name = uri.split("://", 1)[-1].split("?", 1)[0]
    name = name[1:] if name.startswith("/") else name
    return None if name in ("", ":memory:") else Path(name)


def absolute_uri(uri: str) -> str:
    """``sqlite:///rel.db`` -> ``sqlite:////abs/rel.db``, so workers in other directories agree."""
    db = sqlite_path(uri)
    if db is None or db.is_absolute():
        return uri
    query = uri.partition("?")[2]
    return f"sqlite:///{db.resolve()}" + (f"?{query}" if query else "")


def display_uri(uri: str) -> str:
    """``uri`` without its ``user:password@`` part, for messages and reports."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _artifact_root(uri: str) -> str | None:
    """For a SQLite store, keep artifacts beside the database file (``mlartifacts/``), so a
    store is one self-contained folder; a tracking server chooses its own location."""
    db = sqlite_path(uri)
    return (db.resolve().parent / "mlartifacts").as_uri() if db is not None else None


def git_commit(cwd: Path | None = None) -> tuple[str, bool]:
    """(commit, dirty) of the checkout the code runs from; ("unknown", False) outside git."""
    here = cwd or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "unknown", False
    if commit.returncode != 0:
        return "unknown", False
    return commit.stdout.strip(), bool(dirty.stdout.strip())


def enable_system_metrics() -> None:
    """``--system-metrics``: switch on MLflow's own system-metrics monitor (CPU, memory, disk,
    network; GPU with pynvml) for every training run. MLflow's switch is an environment variable,
    so worker processes started after this inherit it; its CPU/memory monitor needs psutil."""
    import mlflow

    try:
        import psutil  # noqa: F401 - MLflow's monitor imports it
    except ImportError:
        raise UserError("--system-metrics needs the psutil package (pip install -e '.[system-metrics]'), "
                        "or leave --system-metrics out") from None
    mlflow.enable_system_metrics_logging()


def system_metrics_enabled() -> bool:
    """MLflow's own setting (``--system-metrics``, or MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=true)."""
    from mlflow.environment_variables import MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING

    return bool(MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING.get())


def get_or_create_experiment(client: Any, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    root = _artifact_root(uri)
    return client.create_experiment(name, artifact_location=f"{root}/{name}" if root else None)


def connect(uri: str) -> Any:
    """An ``MlflowClient`` for ``uri``; a store that cannot be reached is a UserError.

    A tracking server is first probed with one TCP connect (seconds): MLflow's own client
    retries a refused connection 7 times with exponential backoff, about 4 minutes, before
    it gives up, which is no way to say "the server is not running".
    """
    import mlflow
    from mlflow import MlflowClient

    _probe_server(uri)
    _check_sqlite_location(uri)
    mlflow.set_tracking_uri(uri)
    try:
        client = MlflowClient(tracking_uri=uri)  # a SQLite store is opened (and created) here
        client.search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 - any failure here means the store is unusable
        raise UserError(f"cannot reach the MLflow tracking store {display_uri(uri)}: {_first_line(e)} "
                        "(check --tracking-uri / MLFLOW_TRACKING_URI, or start the server)") from None
    return client


def _probe_server(uri: str) -> None:
    """For http(s) stores, fail fast if nothing listens at the server's address."""
    import requests.utils

    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or requests.utils.get_environ_proxies(uri):
        return  # not a server, or reached through a proxy that this probe cannot speak for
    try:
        address = (parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80))
        socket.create_connection(address, timeout=PROBE_TIMEOUT_S).close()
    except (OSError, ValueError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
        raise UserError(f"cannot reach the MLflow tracking server {display_uri(uri)}: {why} (start it, e.g. "
                        "'mlflow server --port N', or check --tracking-uri / MLFLOW_TRACKING_URI)") from None


def _check_sqlite_location(uri: str) -> None:
    """A SQLite store must be a file, or creatable where it is named.

    Checked here because MLflow would first make the parent folders, then retry opening an
    uncreatable file ten times with exponential backoff (~100 s) before raising.
    """
    db = sqlite_path(uri)
    if db is None:
        return
    if db.exists():
        if not db.is_file():
            raise UserError(f"the MLflow store {db} ({uri}) is not a file; point --tracking-uri at a .db file")
        return
    check_can_create(db.parent, "the MLflow store's folder", "choose another --tracking-uri")


@contextmanager
def no_download_bars() -> Iterator[None]:
    """No MLflow 'Downloading artifacts' bar per file: the report and the diagnostics show their own."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    old = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def search_all_runs(client: Any, experiment_id: str, filter_string: str = "",
                    order_by: list[str] | None = None) -> list[Any]:
    """Every active run of the experiment matching ``filter_string``, all pages of MLflow's 1000 cap."""
    from mlflow.entities import ViewType

    out, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string, run_view_type=ViewType.ACTIVE_ONLY,
                                  max_results=1000, order_by=order_by, page_token=token)
        out += list(page)
        token = page.token
        if not token:
            return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return " ".join(text.splitlines()[0].split())[:200] if text else type(e).__name__


def _transient(e: BaseException) -> bool:
    """A failure that a later attempt may not have: the store unreachable, restarting, busy or locked.

    MLflow reports a refused connection or a 5xx reply as an ``MlflowException`` with code
    INTERNAL_ERROR; codes for bad values, deleted runs (INVALID_STATE) or missing runs are
    permanent. Anything else that is not an I/O error (a bug) is not retried either.
    """
    from mlflow.exceptions import MlflowException

    if isinstance(e, MlflowException):
        return e.error_code in _TRANSIENT_CODES
    return isinstance(e, OSError) or type(e).__name__ == "OperationalError"  # requests' errors are OSErrors


_TRANSIENT_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "DEADLINE_EXCEEDED", "REQUEST_LIMIT_EXCEEDED",
                    "RESOURCE_EXHAUSTED", "ABORTED"}


class TrackingError(UserError):
    """The tracking store stayed unreachable past the tracker's patience; says what was not stored.

    A UserError so the CLI prints it as one line: the fix (start the server, resume from the
    checkpoint) is the user's.
    """


class _MetricSender:
    """One background thread that writes queued metric batches in order, retrying failures.

    Why not MLflow's ``log_batch(synchronous=False)``: its futures report a failure but drop
    the data, and a failure only comes after MLflow's own retries (minutes). Here a batch
    leaves the queue only once the store has it, so an unreachable or restarting store delays
    metrics but never loses one, and the training loop never waits. Re-sending a batch whose
    reply was lost is harmless: MLflow drops a metric identical to a stored one (same key,
    step, value and timestamp), and the timestamp is fixed when the point is queued.
    """

    def __init__(self, client: Any, run_id: str, uri: str) -> None:
        self.client, self.run_id, self.uri = client, run_id, uri
        self._cv = threading.Condition()
        self._queue: deque[list[Any]] = deque()  # each item: one log() call's metrics (<= 1000)
        self._busy, self._busy_points = False, 0  # a batch is being written, of this many points
        self._closed = False
        self._error: BaseException | None = None  # a permanent failure, raised by the next wait()
        self._down_since: float | None = None
        self._last_failure = ""
        self.failures = 0  # failed write attempts, over the tracker's life
        self._thread: threading.Thread | None = None

    def put(self, chunks: list[list[Any]]) -> None:
        with self._cv:
            if self._closed:
                raise RuntimeError("metrics logged after the run was finished")
            self._queue.extend(chunks)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"mlflow-metrics-{self.run_id[:8]}",
                                                daemon=True)
                self._thread.start()
            self._cv.notify_all()

    def wait(self, timeout: float) -> None:
        """Block until the store has every queued point, or raise TrackingError after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        told = False
        with self._cv:
            while self._queue or self._busy:
                if self._error is not None:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    n = sum(map(len, self._queue)) + self._busy_points
                    down = f" for {time.monotonic() - self._down_since:.0f} s" if self._down_since else ""
                    raise TrackingError(f"the MLflow tracking store {display_uri(self.uri)} has been unreachable"
                                        f"{down}: {n} metric points of run {self.run_id} are not stored "
                                        f"(last error: {self._last_failure or 'none yet, still sending'})")
                if self._down_since is not None and not told:
                    told = True
                    _log.warning("waiting up to %.0f s for the MLflow tracking store %s to store %d buffered "
                                 "metric points", left, display_uri(self.uri),
                                 sum(map(len, self._queue)) + self._busy_points)
                self._cv.wait(min(left, 1.0))
            if self._error is not None:
                error, self._error = self._error, None
                raise TrackingError(f"the MLflow tracking store {display_uri(self.uri)} rejected metrics of run "
                                    f"{self.run_id}: {_first_line(error)}") from error

    def close(self) -> None:
        """Stop the thread once the queue is empty (at once if the queue is given up)."""
        with self._cv:
            self._closed = True
            self._queue.clear()
            self._cv.notify_all()

    def _take(self) -> list[list[Any]] | None:
        """The next batch: whole log() calls from the front of the queue, up to MLflow's limit."""
        with self._cv:
            while not self._queue and not self._closed:
                self._cv.wait()
            if not self._queue:
                return None
            chunks = [self._queue.popleft()]
            while self._queue and sum(map(len, chunks)) + len(self._queue[0]) <= MAX_METRICS_PER_BATCH:
                chunks.append(self._queue.popleft())
            self._busy, self._busy_points = True, sum(map(len, chunks))
            return chunks

    def _run(self) -> None:
        delay = RETRY_FIRST_S
        while (chunks := self._take()) is not None:
            try:
                self.client.log_batch(self.run_id, metrics=[m for c in chunks for m in c], synchronous=True)
            except Exception as e:  # noqa: BLE001 - sorted into transient (retry) and permanent below
                with self._cv:
                    self._busy, self._busy_points = False, 0
                    if not _transient(e):
                        self._error = e  # these points are dropped; the next flush() says so
                        self._cv.notify_all()
                        continue
                    self._queue.extendleft(reversed(chunks))  # back to the front, in order
                    self.failures += 1
                    self._last_failure = _first_line(e)
                    if self._down_since is None:
                        self._down_since = time.monotonic()
                        _log.warning("MLflow tracking store %s unreachable (%s): buffering metrics and retrying",
                                     display_uri(self.uri), self._last_failure)
                    self._cv.notify_all()
                    if self._closed:
                        return
                time.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            with self._cv:
                self._busy, self._busy_points, delay = False, 0, RETRY_FIRST_S
                if self._down_since is not None:
                    _log.warning("MLflow tracking store %s reachable again after %.1f s; buffered metrics sent",
                                 display_uri(self.uri), time.monotonic() - self._down_since)
                    self._down_since = None
                self._cv.notify_all()


class RunTracker:
    """One MLflow run: params and tags at start, buffered metrics, artifacts, a final status.

    Every call survives a tracking store that is briefly away (a server restart): metrics are
    queued and written by a background thread (``log`` never blocks), and the blocking calls
    (``flush``, tags, artifacts, ``finish``) retry with backoff for up to ``patience_s``
    seconds, then raise TrackingError naming what was not stored.
    """

    def __init__(self, client: Any, run_id: str, uri: str = "", patience_s: float | None = None) -> None:
        self.client, self.run_id = client, run_id
        self.uri = uri or str(getattr(client, "tracking_uri", ""))
        self.patience_s = TRACKING_PATIENCE_S if patience_s is None else patience_s
        self._sender = _MetricSender(client, run_id, self.uri)
        self._gave_up = False  # after one give-up, later calls try once instead of waiting again
        self._system: Any = None  # MLflow's SystemMetricsMonitor, when started

    def start_system_metrics(self, *, resume: bool) -> None:
        """MLflow's system-metrics monitor for this run (``system/*`` keys, its own thread);
        ``resume`` continues a reopened run's steps. Stopped by ``finish``."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._system = SystemMetricsMonitor(self.run_id, resume_logging=resume, tracking_uri=self.uri)
        self._system.start()

    @classmethod
    def create(cls, uri: str, experiment: str, run_name: str, params: dict[str, Any],
               tags: dict[str, str], client: Any | None = None) -> "RunTracker":
        """A new run with ``params`` (in batches of MLflow's limit) and ``tags``."""
        client = client or connect(uri)
        experiment_id = get_or_create_experiment(client, experiment, uri)
        run = client.create_run(experiment_id, run_name=run_name, tags=tags)
        tracker = cls(client, run.info.run_id, uri)
        tracker.log_params(params)
        return tracker

    @classmethod
    def reopen(cls, uri: str, run_id: str, client: Any | None = None, *,
               finished_too: bool = False) -> "RunTracker | None":
        """The existing run ``run_id`` set back to RUNNING; None if it is gone, or FINISHED.

        A finished training is never reopened (a rerun must not add to it); a study's parent
        run is (``finished_too``): each rerun of the study continues it.
        """
        from mlflow.exceptions import MlflowException

        client = client or connect(uri)
        tracker = cls(client, run_id, uri)
        try:
            run = tracker._retry("read the run", client.get_run, run_id)
        except MlflowException:  # deleted, or from another store: start afresh
            return None
        if run.info.lifecycle_stage != "active" or (run.info.status == "FINISHED" and not finished_too):
            return None
        tracker._retry("reopen the run", client.update_run, run_id, status="RUNNING")
        return tracker

    def log_params(self, params: dict[str, Any]) -> None:
        """Params in batches of MLflow's limit (MLflow params cannot change once logged)."""
        from mlflow.entities import Param

        items = [Param(k, _param_value(v)) for k, v in sorted(params.items())]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self._retry("log params", self.client.log_batch, self.run_id,
                        params=items[i:i + MAX_PARAMS_PER_BATCH], synchronous=True)

    def history(self, key: str) -> list[tuple[int, float]]:
        """(step, value) of every stored point of ``key``."""
        return [(m.step, m.value) for m in self._retry("read the metric history", self.client.get_metric_history,
                                                       self.run_id, key)]

    def tags(self) -> dict[str, str]:
        return dict(self._retry("read the run", self.client.get_run, self.run_id).data.tags)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        """A matplotlib figure as an image artifact (MLflow's own ``log_figure``)."""
        self._retry(f"log figure {artifact_file}", self.client.log_figure, self.run_id, figure, artifact_file)

    def last_step(self, key: str) -> int:
        """The highest step of ``key`` already stored (-1 if none): what a resumed run must not log again."""
        history = self._retry("read the metric history", self.client.get_metric_history, self.run_id, key)
        return max((m.step for m in history), default=-1)

    def log(self, points: Iterable[Point]) -> None:
        """Queue metric points; they are written in the background, in order, one call per batch."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(name, float(value), now, int(step)) for name, value, step in points]
        if metrics:
            self._sender.put([metrics[i:i + MAX_METRICS_PER_BATCH]
                              for i in range(0, len(metrics), MAX_METRICS_PER_BATCH)])

    @property
    def send_failures(self) -> int:
        """How many metric writes failed and were retried (0 when the store never went away)."""
        return self._sender.failures

    def flush(self) -> None:
        """Wait until the store has every logged metric point (up to ``patience_s`` while it is away)."""
        try:
            self._sender.wait(0.0 if self._gave_up else self.patience_s)
        except TrackingError:
            self._gave_up = True
            raise
        self._gave_up = False

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self._retry(f"set tag {key}", self.client.set_tag, self.run_id, key, value)

    def log_artifacts(self, files: Sequence[tuple[Path, str | None]]) -> None:
        """``[(local file, artifact dir or None), ...]``."""
        for path, artifact_path in files:
            self._retry(f"log artifact {path.name}", self.client.log_artifact, self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            path.write_text(text)
            parent = str(Path(artifact_file).parent)
            self.log_artifacts([(path, None if parent == "." else parent)])

    def finish(self, status: str = "FINISHED", reason: str | None = None) -> None:
        """Flush metrics, record why a run did not finish, and close it with ``status``."""
        try:
            if self._system is not None:
                self._system.finish()
            self.flush()
        finally:
            self._sender.close()
            if reason:
                self._retry("set tag failure_reason", self.client.set_tag, self.run_id, "failure_reason", reason[:5000])
            self._retry(f"mark the run {status}", self.client.set_terminated, self.run_id, status)

    def _retry(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)``, retried with backoff while the store is away, up to ``patience_s``."""
        deadline = time.monotonic() + (0.0 if self._gave_up else self.patience_s)
        delay, told = RETRY_FIRST_S, False
        while True:
            try:
                result = fn(*args, **kwargs)
            except Exception as e:
                if not _transient(e):
                    raise
                if time.monotonic() + delay > deadline:
                    self._gave_up = True
                    raise TrackingError(f"could not {what} for run {self.run_id}: the MLflow tracking store "
                                        f"{display_uri(self.uri)} is unreachable ({_first_line(e)})") from e
                if not told:
                    told = True
                    _log.warning("MLflow tracking store %s unreachable (%s): retrying to %s for up to %.0f s",
                                 display_uri(self.uri), _first_line(e), what, deadline - time.monotonic())
                time.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            self._gave_up = False
            return result


def _param_value(value: Any) -> str:
    return "None" if value is None else str(value)


def describe_study(name: str, scale: str | None, nets: list[str], seeds: list[int], lengths: list[str],
                   dataset: str) -> str:
    """One sentence on what a study ran, from its runs (not from the study file's prose, which
    describes the full study also when the CPU scale ran): the parent run's description. Here, not
    in study, so that the report writes it without importing torch."""
    its = " or ".join(dict.fromkeys(lengths))  # "500 iterations", or each length that occurs
    seed_list = ", ".join(map(str, sorted(set(seeds))))
    where = f", {scale} scale" if scale else ""
    return (f"Depth study {name}{where}: {len(nets)} nets ({', '.join(nets)}) x {len(set(seeds))} "
            f"seed{'s' if len(set(seeds)) > 1 else ''} ({seed_list}), {its} each, on {dataset}.")

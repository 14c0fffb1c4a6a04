"""MLflow, through its own client API: one run per training, metrics in batched async calls.

Why a thin class instead of ``mlflow.start_run``: the fluent API keeps a global active-run
stack, which gets in the way when a study trains several nets in one process, and it makes
it easy to log one metric per call. Here every log interval is a single ``log_batch`` call
(split at MLflow's 1000-metric limit), sent asynchronously so training never waits on SQLite.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .errors import UserError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
MAX_METRICS_PER_BATCH = 1000  # MLflow's limit for one log_batch call
MAX_PARAMS_PER_BATCH = 100

Point = tuple[str, float, int]  # (metric name, value, step)


def resolve_tracking_uri(uri: str | None = None) -> str:
    """``--tracking-uri`` > ``MLFLOW_TRACKING_URI`` > ``sqlite:///mlflow.db`` in the working dir."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _artifact_root(uri: str) -> str | None:
    """For a SQLite store, keep artifacts beside the database file (``mlartifacts/``), so a
    store is one self-contained folder; a tracking server chooses its own location."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        return (db.resolve().parent / "mlartifacts").as_uri()
    return None


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


def get_or_create_experiment(client: Any, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    root = _artifact_root(uri)
    return client.create_experiment(name, artifact_location=f"{root}/{name}" if root else None)


def connect(uri: str) -> Any:
    """An ``MlflowClient`` for ``uri``; a store that cannot be reached is a UserError."""
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    try:
        client.search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 - any failure here means the store is unusable
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot reach the MLflow tracking store {uri}: {first} "
                        "(check --tracking-uri / MLFLOW_TRACKING_URI, or start the server)") from None
    return client


class RunTracker:
    """One MLflow run: params and tags at start, batched metrics, artifacts, a final status."""

    def __init__(self, client: Any, run_id: str) -> None:
        self.client, self.run_id = client, run_id
        self._pending: list[Any] = []

    @classmethod
    def create(cls, uri: str, experiment: str, run_name: str, params: dict[str, Any],
               tags: dict[str, str], client: Any | None = None) -> "RunTracker":
        """A new run with ``params`` (in batches of MLflow's limit) and ``tags``."""
        from mlflow.entities import Param

        client = client or connect(uri)
        experiment_id = get_or_create_experiment(client, experiment, uri)
        run = client.create_run(experiment_id, run_name=run_name, tags=tags)
        items = [Param(k, _param_value(v)) for k, v in sorted(params.items())]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            client.log_batch(run.info.run_id, params=items[i:i + MAX_PARAMS_PER_BATCH], synchronous=True)
        return cls(client, run.info.run_id)

    @classmethod
    def reopen(cls, uri: str, run_id: str, client: Any | None = None) -> "RunTracker | None":
        """The existing run ``run_id`` set back to RUNNING; None if it is gone or finished."""
        client = client or connect(uri)
        try:
            run = client.get_run(run_id)
        except Exception:  # noqa: BLE001 - deleted or from another store: start afresh
            return None
        if run.info.lifecycle_stage != "active" or run.info.status == "FINISHED":
            return None
        client.update_run(run_id, status="RUNNING")
        return cls(client, run_id)

    def last_step(self, key: str) -> int:
        """The highest step of ``key`` already stored (-1 if none): what a resumed run must not log again."""
        history = self.client.get_metric_history(self.run_id, key)
        return max((m.step for m in history), default=-1)

    def log(self, points: Iterable[Point]) -> None:
        """Send metric points in one async call (several if over MLflow's per-batch limit)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(name, float(value), now, int(step)) for name, value, step in points]
        for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            op = self.client.log_batch(self.run_id, metrics=metrics[i:i + MAX_METRICS_PER_BATCH], synchronous=False)
            if op is not None:
                self._pending.append(op)

    def flush(self) -> None:
        """Wait until every async metric batch is written."""
        for op in self._pending:
            op.wait()
        self._pending.clear()

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)

    def log_artifacts(self, files: Sequence[tuple[Path, str | None]]) -> None:
        """``[(local file, artifact dir or None), ...]``."""
        for path, artifact_path in files:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            path.write_text(text)
            parent = str(Path(artifact_file).parent)
            self.client.log_artifact(self.run_id, str(path), None if parent == "." else parent)

    def finish(self, status: str = "FINISHED", reason: str | None = None) -> None:
        """Flush metrics, record why a run did not finish, and close it with ``status``."""
        try:
            self.flush()
        finally:
            if reason:
                self.client.set_tag(self.run_id, "failure_reason", reason[:5000])
            self.client.set_terminated(self.run_id, status)


def _param_value(value: Any) -> str:
    return "None" if value is None else str(value)

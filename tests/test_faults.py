"""Faults (issue 7): kill -9 at random points, a tracking server that is down or restarts,
corrupt dataset files, outputs that cannot be written.

Every training here is the same small CPU run (resnet-8 on the synthetic set), so one
uninterrupted reference run is what each faulted run must reproduce, metric for metric.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
import torch
from mlflow import MlflowClient

import resnet_lab.train as train_mod
from resnet_lab.checkpoint import checkpoint_path
from resnet_lab.checkpoint import load as load_checkpoint
from resnet_lab.cli import build_config, make_parser
from resnet_lab_command import main
from resnet_lab.config import TrainConfig
from resnet_lab.data import load_dataset
from resnet_lab.errors import UserError
from resnet_lab.tracking import RunTracker, TrackingError
from resnet_lab.train import train

HOST = socket.gethostname().replace(".", "_")  # checkpoint temp files are named .<ckpt>.<host>-<pid>.tmp

ITERATIONS, LOG_EVERY, EVAL_EVERY = 56, 2, 28
Histories = dict[str, list[tuple[int, float]]]


def _cfg(tracking_uri: str, experiment: str, **changes: object) -> TrainConfig:
    """On the CPU: the tests here assert bit-identical histories, which bf16 on a GPU does not give."""
    base = TrainConfig(model="resnet-8", dataset="synthetic", iterations=ITERATIONS, log_every=LOG_EVERY,
                       eval_every=EVAL_EVERY, batch_size=32, eval_batch_size=512, tracking_uri=tracking_uri,
                       experiment=experiment, progress=False, checkpoint_every=0, device="cpu")
    return dataclasses.replace(base, **changes)


def _cli_args(tracking_uri: str, experiment: str, checkpoint_dir: Path) -> list[str]:
    """The command line of ``_cfg(...)`` with a checkpoint at every log step."""
    return ["train", "--model", "resnet-8", "--dataset", "synthetic", "--iterations", str(ITERATIONS), "--no-progress",
            "--device", "cpu",
            "--tracking-uri", tracking_uri, "--experiment", experiment, "--set", f"log_every={LOG_EVERY}",
            "--set", f"eval_every={EVAL_EVERY}", "--set", "batch_size=32", "--set", "eval_batch_size=512",
            "--set", f"checkpoint_every={LOG_EVERY}", "--set", f"checkpoint_dir={checkpoint_dir}"]


def _histories(client: MlflowClient, run_id: str) -> Histories:
    """Every metric key -> [(step, value)] as stored, duplicates kept; throughput keeps only its steps."""
    out = {}
    for key in client.get_run(run_id).data.metrics:
        points = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        out[key] = [(s, 0.0) for s, _ in points] if key == "perf/images_per_s" else points
    return out


def _duplicates(histories: Histories) -> dict[str, list[int]]:
    dup = {k: sorted({s for s, _ in h if [t for t, _ in h].count(s) > 1}) for k, h in histories.items()}
    return {k: v for k, v in dup.items() if v}


def _runs(client: MlflowClient, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread here and in the subprocesses (ONE_THREAD): on a shared 2-core box two
    threads per process oversubscribe the cores and a step gets several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def reference(tracking_uri: str) -> Histories:
    """The uninterrupted run every faulted run must reproduce."""
    result = train(_cfg(tracking_uri, "faults-reference"))
    assert result.status == "FINISHED"
    histories = _histories(MlflowClient(tracking_uri), result.run_id)
    assert len(histories["train/loss"]) == ITERATIONS // LOG_EVERY and not _duplicates(histories)
    return histories


def _at_iteration(monkeypatch: pytest.MonkeyPatch, actions: dict[int, Callable[[], None]]) -> None:
    """Run ``actions[i]`` when the loop starts iteration i (lr_at is called once per iteration)."""
    real, fired = train_mod.lr_at, set()

    def lr_at(cfg: TrainConfig, it: int) -> float:
        if it in actions and it not in fired:
            fired.add(it)
            actions[it]()
        return real(cfg, it)

    monkeypatch.setattr(train_mod, "lr_at", lr_at)


# --------------------------------------------------------------------------- kill -9 at random points

KILLS = 10
MID_WRITE_KILL = 4  # this kill lands while a checkpoint is being written (fsync slowed down to make it certain)
SLOW_FSYNC = ("import os, runpy, sys, time; fsync = os.fsync; os.fsync = lambda fd: (time.sleep(1.0), fsync(fd))[1]; "
              "sys.argv = ['resnet_lab', *sys.argv[1:]]; runpy.run_module('resnet_lab', run_name='__main__')")


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def _wait_for(what: str, cond: Callable[[], bool], proc: subprocess.Popen, log: Path, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"train exited ({proc.returncode}) before {what}; the run is sized for {KILLS} kills: "
                        f"{log.read_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout:.0f} s")
        time.sleep(0.002)


def test_kill_9_at_ten_random_points_resumes_into_one_finished_run_with_the_same_metrics(
        tracking_uri: str, tmp_path: Path, reference: Histories) -> None:
    """Each process is killed after it wrote >= 1 checkpoint, a random fraction of a checkpoint
    interval later (so mid-step, mid-log, mid-eval or mid-write); the fifth lands inside a write.
    Kills start after the first checkpoint: a process killed before it leaves a RUNNING run and
    no checkpoint, so its rerun is a new run (the study runner marks such strays KILLED)."""
    rng = random.Random(7)
    experiment, ckpt_dir = "faults-sigkill", tmp_path / "ckpt"
    args = _cli_args(tracking_uri, experiment, ckpt_dir)
    cfg = build_config(make_parser().parse_args(args))
    assert cfg.config_hash() == _cfg(tracking_uri, "x").config_hash()  # same training as the reference
    ckpt = checkpoint_path(cfg)
    assert ckpt is not None
    client = MlflowClient(tracking_uri)
    env = os.environ | ONE_THREAD | {"PYTHONUNBUFFERED": "1"}
    killed_pids: set[int] = set()
    interval, iterations_at_kill = None, []

    for attempt in range(KILLS + 1):
        cmd = [sys.executable, "-c", SLOW_FSYNC, *args] if attempt == MID_WRITE_KILL else \
            [sys.executable, "-m", "resnet_lab", *args]
        before, log = _stamp(ckpt), tmp_path / f"train-{attempt}.log"
        with log.open("w") as out:
            proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            if attempt == KILLS:
                assert proc.wait(timeout=300) == 0, log.read_text()
                break
            if attempt == MID_WRITE_KILL:
                tmp_name = f".{ckpt.name}.{HOST}-{proc.pid}.tmp"
                _wait_for("a checkpoint write", lambda: (ckpt.parent / tmp_name).exists(), proc, log)
            else:
                _wait_for("a new checkpoint", lambda: _stamp(ckpt) != before, proc, log)
                if interval is None:  # the first process also measures one checkpoint interval
                    t0, first = time.monotonic(), _stamp(ckpt)
                    _wait_for("a second checkpoint", lambda: _stamp(ckpt) != first, proc, log)
                    interval = time.monotonic() - t0
                wrote, kill_at = _stamp(ckpt), time.monotonic() + rng.uniform(0.0, interval)
                while time.monotonic() < kill_at and _stamp(ckpt) == wrote:  # at most one more checkpoint
                    time.sleep(0.002)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == -signal.SIGKILL, f"kill {attempt + 1}: train ended by itself"
        killed_pids.add(proc.pid)

        runs = _runs(client, experiment)
        assert len(runs) == 1 and runs[0].info.status == "RUNNING", [r.info.status for r in runs]
        state = load_checkpoint(ckpt)  # always present and loadable after a kill
        assert state["run_id"] == runs[0].info.run_id
        iterations_at_kill.append(state["iteration"])
        tmps = {p.name for p in ckpt.parent.glob("*.tmp")}
        assert tmps <= {f".{ckpt.name}.{HOST}-{pid}.tmp" for pid in killed_pids}, tmps
        if attempt == MID_WRITE_KILL:  # the write it died in left the previous checkpoint whole
            assert f".{ckpt.name}.{HOST}-{proc.pid}.tmp" in tmps
            assert state["iteration"] == iterations_at_kill[-2]
        else:
            assert attempt == 0 or state["iteration"] > iterations_at_kill[-2]  # each process got further
        steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")]
        assert len(steps) == len(set(steps)) and max(steps) >= state["iteration"]

    (run,) = _runs(client, experiment)
    assert run.info.status == "FINISHED"
    got = _histories(client, run.info.run_id)
    assert not _duplicates(got)
    assert got == reference
    assert not ckpt.exists()
    assert not list(ckpt_dir.rglob("*.tmp"))  # the finished run removed the dead writers' temp files


def test_a_temp_file_left_by_a_killed_writer_is_removed_by_the_resumed_run(tracking_uri: str, tmp_path: Path) -> None:
    """kill -9 during a checkpoint write leaves ``.<ckpt>.<host>-<pid>.tmp`` (the test above makes one);
    the run that resumes must not leave it lying in the checkpoint folder forever."""
    cfg = _cfg(tracking_uri, "faults-stale-tmp", iterations=8, checkpoint_every=4, checkpoint_dir=str(tmp_path))
    ckpt = checkpoint_path(cfg)
    assert ckpt is not None
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    ckpt.parent.mkdir(parents=True)
    stale = ckpt.parent / f".{ckpt.name}.{HOST}-{dead.pid}.tmp"
    stale.write_bytes(b"half a checkpoint")
    assert train(cfg).status == "FINISHED"
    assert not stale.exists()


# --------------------------------------------------------------------------- the tracking server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """``mlflow server`` on a SQLite file, in its own process group so stop() ends its workers too."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self._lock, self._closed = threading.Lock(), False

    def start(self) -> None:
        exe = Path(sys.executable).parent / "mlflow"
        with self._lock:
            if self._closed:  # a restart thread outlived a failed test: start nothing
                return
            self.starts += 1
            with open(self.root / f"server-{self.starts}.log", "w") as log:
                self.proc = subprocess.Popen(
                    [str(exe), "server", "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
                     "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1",
                     "--port", str(self.port), "--workers", "1"],
                    cwd=self.root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                    env=os.environ | ONE_THREAD)

    def wait_up(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{self.uri}/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            log = self.root / f"server-{self.starts}.log"
            assert self.proc is not None and self.proc.poll() is None, log.read_text()
            time.sleep(0.1)
        raise AssertionError(f"mlflow server not up within {timeout:.0f} s")

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self.stop()
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # whatever of the group is left
            except (ProcessLookupError, PermissionError):
                pass

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        deadline = time.monotonic() + 20  # its uvicorn worker and job runner go with the group
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            except OSError:
                return
            time.sleep(0.05)
        os.killpg(self.proc.pid, signal.SIGKILL)


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[MlflowServer]:
    if not (Path(sys.executable).parent / "mlflow").exists():
        pytest.skip("the mlflow command is not installed next to this Python")
    server = MlflowServer(tmp_path)
    server.start()
    try:
        server.wait_up()
        yield server
    finally:
        server.close()


def test_tracking_server_restarts_mid_run_and_at_the_end_and_no_metric_is_lost(
        mlflow_server: MlflowServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, reference: Histories) -> None:
    """Two outages: at iteration 5 (the points of 6 and 8 are buffered; the checkpoint at 8
    waits for the server), and 2 iterations before the end (the last points, the artifacts and
    the final status wait for it). MLflow's own HTTP retries are off, so RunTracker's buffering
    and retries carry both outages alone."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    restarts: list[threading.Thread] = []

    def outage() -> None:
        mlflow_server.stop()

        def restart() -> None:
            time.sleep(2.0)
            mlflow_server.start()
            mlflow_server.wait_up()

        restarts.append(threading.Thread(target=restart, daemon=True))
        restarts[-1].start()

    _at_iteration(monkeypatch, {5: outage, ITERATIONS - 2: outage})
    cfg = _cfg(mlflow_server.uri, "faults-restart", checkpoint_every=8, checkpoint_dir=str(tmp_path / "ckpt"))
    with caplog.at_level("WARNING", logger="resnet_lab.tracking"):
        result = train(cfg)
    for t in restarts:
        t.join(timeout=180)
    assert result.status == "FINISHED" and mlflow_server.starts == 3
    messages = [r.getMessage() for r in caplog.records if r.name == "resnet_lab.tracking"]
    assert any("unreachable" in m and "buffering" in m for m in messages), messages
    assert any("reachable again" in m for m in messages), messages

    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    got = _histories(client, result.run_id)
    assert not _duplicates(got)
    assert got == reference  # every key, every step, every value
    assert {a.path for a in client.list_artifacts(result.run_id)} >= {"config.json", "model", "probes"}


def test_tracking_server_unreachable_at_start_is_one_line_in_seconds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """MLflow alone would retry a refused connection for ~4 minutes before saying anything."""
    monkeypatch.chdir(tmp_path)
    start = time.monotonic()
    code = main(["train", "--model", "resnet-8", "--dataset", "synthetic", "--iterations", "10", "--no-progress",
                 "--tracking-uri", f"http://127.0.0.1:{_free_port()}"])
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "cannot reach the MLflow tracking server" in err, err
    assert elapsed < 30, f"took {elapsed:.0f} s"
    assert not list(tmp_path.iterdir())  # no store, no checkpoint, nothing


def test_metrics_logged_while_the_store_is_down_do_not_block_and_flush_gives_up_with_a_clear_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"http://127.0.0.1:{_free_port()}"
    tracker = RunTracker(MlflowClient(uri), "0" * 32, uri, patience_s=2.0)
    start = time.monotonic()
    for step in range(1, 51):
        tracker.log([("train/loss", 1.0 / step, step), ("lr", 0.1, step)])
    assert time.monotonic() - start < 1.0  # the training loop never waits on the store
    with pytest.raises(TrackingError, match=r"100 metric points of run 0{32} are not stored") as info:
        tracker.flush()
    assert uri in str(info.value) and time.monotonic() - start < 30
    assert tracker.send_failures >= 1
    start = time.monotonic()
    with pytest.raises(TrackingError):  # having given up once, finishing does not wait all over again
        tracker.finish("FAILED", reason="tracking store gone")
    assert time.monotonic() - start < 15


def test_metrics_the_store_rejects_are_reported_not_retried_forever(tracking_uri: str) -> None:
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("faults-rejected")
    run = client.create_run(exp.experiment_id if exp else client.create_experiment("faults-rejected"))
    client.delete_run(run.info.run_id)  # a deleted run accepts no metrics: a permanent error
    tracker = RunTracker(client, run.info.run_id, tracking_uri, patience_s=60.0)
    tracker.log([("train/loss", 1.0, 1)])
    start = time.monotonic()
    with pytest.raises(TrackingError, match="rejected metrics"):
        tracker.flush()
    assert time.monotonic() - start < 10 and tracker.send_failures == 0


# --------------------------------------------------------------------------- corrupt dataset files

FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _fashion_copy(src: Path, dst: Path, name: str, content: bytes, *, raw: bool = False) -> Path:
    """``dst`` with the real files linked in, except ``name`` (.gz, or raw if ``raw``) = ``content``."""
    dst.mkdir(exist_ok=True)
    for f in FILES:
        if f != name:
            (dst / f"{f}.gz").symlink_to(src / f"{f}.gz")
    bad = dst / (name if raw else f"{name}.gz")
    bad.write_bytes(content)
    return bad


def _corruptions(src: Path) -> dict[str, tuple[str, bytes, bool, str]]:
    """case -> (file, content, raw?, what the message says)."""
    train_images = (src / "train-images-idx3-ubyte.gz").read_bytes()
    test_labels = gzip.decompress((src / "t10k-labels-idx1-ubyte.gz").read_bytes())
    train_labels = gzip.decompress((src / "train-labels-idx1-ubyte.gz").read_bytes())
    return {
        "gzip cut short": ("train-images-idx3-ubyte", train_images[: len(train_images) // 3], False, "cannot read"),
        "not gzip at all": ("train-labels-idx1-ubyte", b"<html>404 Not Found</html>\n", False, "cannot read"),
        "labels where images belong": ("t10k-images-idx3-ubyte", gzip.compress(test_labels), False, "bad magic number"),
        "raw file truncated": ("t10k-labels-idx1-ubyte", test_labels[:-100], True, "truncated or corrupt"),
        "labels of the other split": ("t10k-labels-idx1-ubyte", gzip.compress(train_labels), False,
                                      "from different sets"),
    }


def test_corrupt_or_truncated_dataset_files_are_named_in_the_error(fashion_mnist_dir: Path, tmp_path: Path) -> None:
    for case, (name, content, raw, says) in _corruptions(fashion_mnist_dir).items():
        bad = _fashion_copy(fashion_mnist_dir, tmp_path / case.replace(" ", "_"), name, content, raw=raw)
        with pytest.raises(UserError) as info:
            load_dataset("fashion-mnist", data_dir=bad.parent)
        assert says in str(info.value) and str(bad) in str(info.value), (case, str(info.value))


def test_cli_with_a_truncated_dataset_file_exits_2_in_one_line_before_any_run(
        fashion_mnist_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    labels = (fashion_mnist_dir / "train-labels-idx1-ubyte.gz").read_bytes()
    bad = _fashion_copy(fashion_mnist_dir, tmp_path / "fm", "train-labels-idx1-ubyte", labels[:-40])
    monkeypatch.chdir(tmp_path)
    code = main(["train", "--model", "resnet-8", "--dataset", "fashion-mnist", "--data-dir", str(bad.parent),
                 "--iterations", "10", "--no-progress", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and str(bad) in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fm"]  # no store, no checkpoint folder


# --------------------------------------------------------------------------- outputs that cannot be written


def _not_a_dir(tmp: Path) -> Path:
    """A path below a regular file: unwritable even for root (a read-only folder is not, for root)."""
    f = tmp / "a-file"
    f.write_text("")
    return f / "sub"


BAD_STORES = {
    "tracking DB below a file": (lambda tmp: f"sqlite:///{_not_a_dir(tmp)}/mlflow.db", "not a writable directory"),
    "tracking DB in /proc": (lambda tmp: "sqlite:////proc/resnet-lab-test/mlflow.db", "not a writable directory"),
    "tracking DB is a folder": (lambda tmp: f"sqlite:///{tmp}", "is not a file"),
    "server port out of range": (lambda tmp: "http://127.0.0.1:99999", "cannot reach the MLflow tracking server"),
    "unknown URI scheme": (lambda tmp: "ftp://127.0.0.1/mlflow", "cannot reach the MLflow tracking store"),
}


@pytest.mark.parametrize("case", sorted(BAD_STORES))
def test_bad_tracking_store_exits_2_in_one_line_and_writes_nothing(
        case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    make, says = BAD_STORES[case]
    uri = make(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    start = time.monotonic()
    code = main(["train", "--model", "resnet-8", "--dataset", "synthetic", "--iterations", "10", "--no-progress",
                 "--tracking-uri", uri])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and says in err, err
    assert time.monotonic() - start < 30  # MLflow alone retries an uncreatable SQLite file for ~100 s
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_unwritable_checkpoint_dir_exits_2_in_one_line_before_any_run(
        tracking_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    client = MlflowClient(tracking_uri)
    code = main(["train", "--model", "resnet-8", "--dataset", "synthetic", "--iterations", "8", "--no-progress",
                 "--tracking-uri", tracking_uri, "--experiment", "faults-bad-ckpt-dir",
                 "--set", f"checkpoint_dir={_not_a_dir(tmp_path)}", "--set", "checkpoint_every=4",
                 "--set", "log_every=4"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "checkpoint_dir" in err, err
    assert _runs(client, "faults-bad-ckpt-dir") == []


@pytest.mark.parametrize("where", [
    "below a file",
    "in /proc",
])
def test_report_to_an_unwritable_folder_exits_2_in_one_line(
        where: str, tracking_uri: str, tmp_path: Path, reference: Histories,
        capsys: pytest.CaptureFixture[str]) -> None:
    out = _not_a_dir(tmp_path) if where == "below a file" else Path("/proc/resnet-lab-test")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code = main(["report", "faults-reference", "--tracking-uri", tracking_uri, "--out", str(out), "--no-mlflow"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and str(out) in err, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before

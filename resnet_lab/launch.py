"""How a study's runs are executed: inline, in spawned worker processes, as Ray tasks, or as a
submitit job array (SLURM).

The unit a launcher runs is a group of runs (``study.group_runs``: runs of one shape and recipe,
trained as one fused model; a group of one is a run trained alone): a worker process or a Ray
task trains one group. Each launcher hands every group to ``train_runs``, which trains it
(``train.train_group``) and turns whatever happened into one ``Outcome`` per run; the outcomes go
to ``on_done`` in the parent process, which does all study bookkeeping. The MLflow store,
experiment and parent run already exist when a launcher starts (created once in the parent:
concurrent first writers would race on the SQLite schema).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import multiprocessing.connection
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from . import slurm
from .config import TrainConfig
from .errors import UserError
from .models import parse_model_name
from .studyfile import StudyRun
from .train import train_group


@dataclass
class Outcome:
    """How one run of a study ended, as the study reports it."""

    run: StudyRun
    status: str  # FINISHED / FAILED / KILLED / SKIPPED
    run_id: str | None  # None when the run failed before its MLflow run existed (or it is not known yet)
    metrics: dict[str, float]
    reason: str | None
    seconds: float


OnDone = Callable[[Outcome], None]
Group = list[StudyRun]  # runs trained together as one fused model (one run: alone)


def train_runs(group: Group, cfgs: list[TrainConfig], parent_id: str, tags: dict[str, str], *,
               interrupted: str | None = None) -> list[Outcome]:
    """Train the runs of ``group`` with ``cfgs`` (their configs, placed on a device) as children of
    ``parent_id``, as one group; any exception becomes a FAILED outcome of each of its runs, so one
    failing group never stops the others.

    ``interrupted`` is how a Ctrl-C / cancellation is reported (workers and Ray tasks: their
    runs end KILLED); None lets it through (inline: Ctrl-C stops the whole study).
    """
    t0 = time.perf_counter()
    try:
        results = train_group(cfgs, parent_run_id=parent_id, extra_tags=tags)
        return [Outcome(run, r.status, r.run_id, r.metrics, r.reason, time.perf_counter() - t0)
                for run, r in zip(group, results)]
    except KeyboardInterrupt:
        if interrupted is None:
            raise
        return [Outcome(run, "KILLED", None, {}, interrupted, time.perf_counter() - t0) for run in group]
    except Exception as e:  # noqa: BLE001 - any failure of one group: record it, go on with the next
        return [Outcome(run, "FAILED", None, {}, _reason(e), time.perf_counter() - t0) for run in group]


def _reason(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())[:2000]


def run_cost(run: StudyRun) -> float:
    """A run's compute relative to the other runs of its study, for the ETA: depth x images seen."""
    cfg = run.cfg
    iterations = cfg.iterations or (cfg.epochs or 1) * (cfg.train_size or 50_000) // cfg.batch_size
    return parse_model_name(cfg.model).depth * iterations * cfg.batch_size * (cfg.resize or 28) ** 2


class Reporter:
    """One line per run start/finish, and an overall bar (runs done/total, elapsed, ETA).

    The ETA weighs each run by ``run_cost`` (a 56-layer net takes about three times a 20-layer
    one) at the seconds per unit of cost measured so far, spread over ``jobs`` parallel slots.
    Without the bar (``--no-progress``, logs) each finish line carries the count and the ETA.
    """

    def __init__(self, runs: list[StudyRun], done: set[int], desc: str, progress: bool, jobs: int = 1,
                 notes: dict[int, str] | None = None) -> None:
        self.total, self.count, self.jobs = len(runs), len(done), max(jobs, 1)
        self.notes = notes or {}
        self.cost = {r.index: run_cost(r) for r in runs if r.index not in done}  # runs not ended yet
        self.started_at: dict[int, float] = {}
        self.busy = self.cost_done = 0.0
        self.bar = tqdm(total=self.total, initial=self.count, desc=desc, disable=not progress, dynamic_ncols=True,
                        file=sys.stdout, bar_format="{desc}: {n_fmt}/{total_fmt} runs |{bar}| {elapsed}{postfix}")

    def line(self, text: str) -> None:
        if self.bar.disable:
            print(text, flush=True)
        else:
            self.bar.write(text, file=sys.stdout)

    def started(self, group: Group, where: str, verb: str = "started on") -> None:
        """A line per run of ``group``, each naming the runs it is fused with."""
        for run in group:
            self.started_at[run.index] = time.perf_counter()
            notes = [f"fused with {', '.join(r.name for r in group if r is not run)}"] if len(group) > 1 else []
            notes += [self.notes[run.index]] if run.index in self.notes else []
            self.line(f"[{run.index}/{self.total}] {run.name} {verb} {where}{''.join(f'; {n}' for n in notes)}")

    def done(self, run: StudyRun, text: str) -> None:
        """``run`` ended (finished, failed or killed): report it, advance the bar and the ETA."""
        now = time.perf_counter()
        self.count += 1
        self.busy += now - self.started_at.pop(run.index, now)
        self.cost_done += self.cost.pop(run.index, 0.0)
        eta = self.eta(now)
        eta_text = f"ETA {tqdm.format_interval(eta)}" if eta is not None and self.count < self.total else ""
        if self.bar.disable:
            text += f" ({self.count}/{self.total} runs done{f', {eta_text}' if eta_text else ''})"
        self.line(text)
        self.bar.set_postfix_str(f", {eta_text}" if eta_text else "", refresh=False)
        self.bar.update(1)

    def eta(self, now: float) -> float | None:
        """List scheduling: each slot first finishes its run under way, then takes the waiting
        runs in study order as it frees up; the ETA is when the last slot is done."""
        if not (self.cost_done and self.busy):
            return None
        rate = self.busy / self.cost_done  # seconds per unit of cost, in one slot
        # A run past its estimate is taken to need a tenth of it more, not nothing.
        slots = [max(self.cost[i] * rate - (now - t), 0.1 * self.cost[i] * rate) for i, t in self.started_at.items()]
        slots += [0.0] * max(self.jobs - len(slots), 0)
        for index, cost in self.cost.items():
            if index not in self.started_at:
                k = slots.index(min(slots))
                slots[k] += cost * rate
        return max(slots)

    def close(self) -> None:
        self.bar.close()


# ---------------------------------------------------------------- inline (--jobs 1)

def run_inline(groups: list[Group], parent_id: str, tags: dict[str, str], reporter: Reporter,
               on_done: OnDone, device: str) -> None:
    """One group after another in this process (per-group progress bars stay on)."""
    for group in groups:
        reporter.started(group, device)
        for outcome in train_runs(group, [dataclasses.replace(r.cfg, device=device) for r in group], parent_id, tags):
            on_done(outcome)


# ---------------------------------------------------------------- worker processes (--jobs N)

def _watch_parent() -> None:
    """A worker dies with its study process (e.g. SIGKILL), as an inline run would: its run stays
    RUNNING with its checkpoint, and the rerun resumes it; it never races a resumed copy."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(70)

    threading.Thread(target=watch, daemon=True, name="watch-parent").start()


def _worker(conn: Any, group: Group, cfgs: list[TrainConfig], parent_id: str, tags: dict[str, str],
            threads: int | None) -> None:
    """Entry point of a spawned worker: train one group, send back its outcomes."""
    _watch_parent()
    if threads:
        torch.set_num_threads(threads)
    try:
        conn.send(train_runs(group, cfgs, parent_id, tags, interrupted="interrupted (Ctrl-C)"))
    finally:
        conn.close()


@dataclass
class _Worker:
    """A spawned process training one group, and its end of the pipe the outcomes come back on."""

    group: Group
    proc: Any  # multiprocessing.Process
    conn: Any  # multiprocessing.connection.Connection
    device: str
    started: float
    outcomes: list[Outcome] | None = None
    listening: bool = True  # False once the outcome came, or the pipe closed without one (the process died)

    def receive(self) -> None:
        try:
            self.outcomes = self.conn.recv()
        except (EOFError, OSError):
            pass
        self.listening = False

    def ended(self) -> list[Outcome]:
        """Its outcomes once the process exited; FAILED ones when it died without sending any."""
        self.proc.join()
        if self.listening and self.conn.poll():
            self.receive()
        self.conn.close()
        return self.outcomes or [Outcome(run, "FAILED", None, {}, f"worker process died with exit code "
                                         f"{self.proc.exitcode}", time.perf_counter() - self.started)
                                 for run in self.group]


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def run_processes(groups: list[Group], parent_id: str, tags: dict[str, str], reporter: Reporter,
                  on_done: OnDone, jobs: int, devices: list[str]) -> None:
    """Up to ``jobs`` groups at once, each in its own spawned process, spread over ``devices``
    (least busy first). CPU workers split the cores between them."""
    ctx = multiprocessing.get_context("spawn")
    pending = deque(groups)
    active: dict[Any, _Worker] = {}  # process sentinel -> worker
    busy = {d: 0 for d in devices}
    threads = max(1, cpu_count() // jobs)
    try:
        while pending or active:
            while pending and len(active) < jobs:
                device = min(devices, key=lambda d: busy[d])
                busy[device] += 1
                worker = _start_worker(ctx, pending.popleft(), device, parent_id, tags, threads)
                active[worker.proc.sentinel] = worker
                reporter.started(worker.group, f"{device} (pid {worker.proc.pid})")
            ready = multiprocessing.connection.wait(list(active) + [w.conn for w in active.values() if w.listening])
            for worker in active.values():
                if worker.listening and worker.conn in ready:
                    worker.receive()
            for sentinel in [s for s, w in active.items() if not w.proc.is_alive()]:
                worker = active.pop(sentinel)
                busy[worker.device] -= 1
                for outcome in worker.ended():
                    on_done(outcome)
    except KeyboardInterrupt:
        # Ctrl-C reached the workers too (same process group): give them time to mark their runs KILLED.
        for worker in active.values():
            worker.proc.join(timeout=30)
            if worker.proc.is_alive():
                worker.proc.terminate()
        raise


def _start_worker(ctx: Any, group: Group, device: str, parent_id: str, tags: dict[str, str],
                  threads: int) -> _Worker:
    recv, send = ctx.Pipe(duplex=False)
    own_device, env = gpu_of_worker(device)
    cfgs = [dataclasses.replace(run.cfg, device=own_device, progress=False) for run in group]
    proc = ctx.Process(target=_worker, name=f"study-{group[0].name}", daemon=True,
                       args=(send, group, cfgs, parent_id, tags, threads if device == "cpu" else None))
    with _environ(env):  # a spawned process starts with this process's environment
        proc.start()
    send.close()
    return _Worker(group, proc, recv, device, time.perf_counter())


def gpu_of_worker(device: str) -> tuple[str, dict[str, str]]:
    """``cuda:N`` -> ("cuda", {"CUDA_VISIBLE_DEVICES": GPU N}): the worker sees its GPU alone, so it is
    also the current device that synchronize, memory stats and compile autotuning use (with
    ``cuda:N`` in a process that sees every GPU, those touch GPU 0). N counts the GPUs this process
    sees, so it is mapped through our own CUDA_VISIBLE_DEVICES. Other devices: unchanged, no variable.
    """
    if not device.startswith("cuda:"):
        return device, {}
    index = int(device.split(":")[1])
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return "cuda", {"CUDA_VISIBLE_DEVICES": visible[index] if visible else str(index)}


@contextmanager
def _environ(changes: dict[str, str]) -> Iterator[None]:
    """``os.environ`` with ``changes`` for the duration (the study's process is single-threaded here)."""
    before = {k: os.environ.get(k) for k in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ---------------------------------------------------------------- Ray (--launcher ray)

def _ray_task(group: Group, parent_id: str, tags: dict[str, str]) -> list[Outcome]:
    """One group's training as a Ray task (runs on whichever node Ray picks)."""
    return train_runs(group, [run.cfg for run in group], parent_id, tags,
                      interrupted="interrupted (Ray task cancelled)")


class RayLauncher:
    """Each group of runs is a Ray task asking for ``gpus_per_run`` GPUs (``num_cpus=1`` on a CPU-only
    cluster): a fused group shares its task's GPU, as its nets share one model.

    The nodes need this project installed (``pip install '.[ray]'``) and must reach the MLflow
    tracking URI: use a tracking server (``--tracking-uri http://host:5000``) on a real cluster.
    """

    def __init__(self, ray: Any, gpus: float, gpus_per_run: float, started_here: bool) -> None:
        self.ray, self.gpus, self.gpus_per_run, self.started_here = ray, gpus, gpus_per_run, started_here

    @classmethod
    def connect(cls, address: str | None, gpus_per_run: float) -> "RayLauncher":
        try:
            import ray
        except ImportError:
            raise UserError("--launcher ray needs Ray, an optional extra: pip install '.[ray]'") from None
        started_here = False
        if not ray.is_initialized():
            try:
                # A local instance (no address, no $RAY_ADDRESS) needs no dashboard: it starts faster.
                local = address is None and not os.environ.get("RAY_ADDRESS")
                ray.init(address=address, logging_level="WARNING", **({"include_dashboard": False} if local else {}))
            except (ConnectionError, ValueError, RuntimeError) as e:
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                raise UserError(f"cannot start or join Ray{f' at {address}' if address else ''}: {first}") from None
            started_here = True
        gpus = float(ray.cluster_resources().get("GPU", 0))
        if gpus and gpus_per_run > gpus:
            if started_here:
                ray.shutdown()
            raise UserError(f"--gpus-per-run {gpus_per_run} is more than the {gpus:g} GPUs of the Ray cluster")
        return cls(ray, gpus, gpus_per_run, started_here)

    def slots(self, max_in_flight: int | None) -> int:
        """How many runs Ray can train at once (for the ETA)."""
        cpus = int(self.ray.cluster_resources().get("CPU", 1))
        n = int(self.gpus // self.gpus_per_run) if self.gpus else cpus
        return max(1, min(n, max_in_flight or n))

    def describe(self) -> str:
        res = self.ray.cluster_resources()
        per = f"{self.gpus_per_run:g} GPU per run" if self.gpus else "1 CPU per run"
        return f"{res.get('CPU', 0):g} CPUs, {self.gpus:g} GPUs, {per}"

    def close(self) -> None:
        if self.started_here and self.ray.is_initialized():
            self.ray.shutdown()

    def run(self, groups: list[Group], parent_id: str, tags: dict[str, str], reporter: Reporter,
            on_done: OnDone, max_in_flight: int | None = None) -> None:
        ray = self.ray
        remote = ray.remote(_ray_task)
        opts = {"num_gpus": self.gpus_per_run} if self.gpus else {"num_cpus": 1}
        pending = deque(groups)
        in_flight: dict[Any, tuple[Group, float]] = {}
        try:
            while pending or in_flight:
                while pending and (max_in_flight is None or len(in_flight) < max_in_flight):
                    group = pending.popleft()
                    task = remote.options(**opts, max_retries=0, name=f"train {' '.join(r.name for r in group)}")
                    ref = task.remote(group, parent_id, tags)
                    in_flight[ref] = (group, time.perf_counter())
                    reporter.started(group, "Ray", verb="submitted to")
                ready, _ = ray.wait(list(in_flight), num_returns=1)
                for ref in ready:
                    group, t0 = in_flight.pop(ref)
                    try:
                        outcomes = ray.get(ref)
                    except Exception as e:  # noqa: BLE001 - the worker died or Ray failed: its runs failed
                        cause = getattr(e, "cause", None) or e
                        outcomes = [Outcome(run, "FAILED", None, {}, _reason(cause), time.perf_counter() - t0)
                                    for run in group]
                    for outcome in outcomes:
                        on_done(outcome)
        except KeyboardInterrupt:
            for ref in in_flight:
                ray.cancel(ref)  # KeyboardInterrupt in the task: train_group marks its runs KILLED
            raise


# ---------------------------------------------------------------- submitit (--launcher submitit)

class TrainTask:
    """One array task: train one run of the study; requeued on preemption or time limit."""

    def __init__(self, run: Any, parent_id: str, tags: dict[str, str]) -> None:
        self.run, self.parent_id, self.tags = run, parent_id, tags
        self.requeued = False

    def __call__(self) -> Any:
        if self.requeued:
            self._settle_unresumable()
        return train_runs([self.run], [self.run.cfg], self.parent_id, self.tags,
                          interrupted="interrupted (job cancelled)")[0]

    def checkpoint(self) -> Any:
        """submitit's hook on preemption or time limit: resubmit this task as it is. The rerun resumes
        the run from its last checkpoint file (``train.train``), in the same MLflow run."""
        import submitit

        self.requeued = True
        return submitit.helpers.DelayedSubmission(self)

    def _settle_unresumable(self) -> None:
        """After a requeue: a RUNNING run of this config under this study that no checkpoint names was
        stopped before its first checkpoint; it ends KILLED (the study's rule for such runs) and the
        run trains afresh, so the store keeps one live run per config."""
        from mlflow import MlflowClient

        from .checkpoint import load as load_checkpoint
        from .train import checkpoint_path

        cfg = self.run.cfg
        path = checkpoint_path(cfg)
        try:
            named = load_checkpoint(path).get("run_id") if path is not None and path.exists() else None
        except UserError:
            named = None
        client = MlflowClient(cfg.tracking_uri)
        experiment = client.get_experiment_by_name(cfg.experiment)
        if experiment is None:
            return
        for r in client.search_runs([experiment.experiment_id], f"tags.config_hash = '{self.run.config_hash}'"):
            if (r.info.status == "RUNNING" and r.info.run_id != named
                    and r.data.tags.get("mlflow.parentRunId") == self.parent_id):
                client.set_tag(r.info.run_id, "failure_reason", "preempted before its first checkpoint; the "
                               "requeued task trained the config afresh")
                client.set_terminated(r.info.run_id, "KILLED")


class SubmititLauncher:
    """Submits a study's runs as one job array on ``cluster`` and waits for it."""

    def __init__(self, cluster: str, settings: slurm.Settings, wait: bool = True,
                 poll_s: float | None = None) -> None:
        try:
            import submitit
        except ImportError:
            raise UserError("--launcher submitit needs submitit, an optional extra: pip install '.[slurm]'") from None
        self.submitit, self.cluster, self.settings, self.wait = submitit, cluster, settings, wait
        self.poll_s = poll_s if poll_s is not None else (30.0 if cluster == "slurm" else 1.0)
        self.jobs: list[Any] = []

    def describe(self) -> str:
        s = self.settings
        where = f"partition {s.partition}" if s.partition else "the default partition"
        return (f"submitit on {self.cluster}: one array task per run on {where}, {s.gpus_per_task} GPU(s) and "
                f"{s.time_min} min per task, {s.array_parallelism} at once")

    def slots(self, runs: int) -> int:
        return max(1, min(runs, self.settings.array_parallelism))

    def executor(self, study_name: str) -> Any:
        folder = Path(self.settings.folder) / study_name / "%j"
        executor = self.submitit.AutoExecutor(folder=str(folder), cluster=self.cluster)
        executor.update_parameters(name=f"resnet-lab-{study_name}", **self.settings.executor_parameters(self.cluster))
        return executor

    def run(self, study_name: str, runs: list[Any], parent_id: str, tags: dict[str, str], reporter: Any,
            on_done: Any) -> list[str]:
        """Submit every run as one array; unless ``--no-wait``, report each outcome as its task ends.
        Returns the job ids."""
        if not runs:
            return []
        executor = self.executor(study_name)
        with executor.batch():  # one sbatch --array for all of them
            futures = [executor.submit(TrainTask(run, parent_id, tags)) for run in runs]
        self.jobs = futures
        submitted(self.jobs, runs)
        for run, job in zip(runs, futures):
            reporter.started([run], f"{self.cluster} job {job.job_id}", verb="submitted as")
        if not self.wait:
            return [j.job_id for j in futures]
        started = time.perf_counter()
        by_job = {id(job): run for job, run in zip(futures, runs)}
        try:
            for job in self.submitit.helpers.as_completed(futures, poll_frequency=self.poll_s):
                run = by_job[id(job)]
                try:
                    outcome = job.result()
                except Exception as e:  # noqa: BLE001 - the task failed or was not requeued: the run failed
                    outcome = Outcome(run, "FAILED", None, {}, _reason(e), time.perf_counter() - started)
                on_done(outcome)
        except KeyboardInterrupt:
            for job in futures:  # Ctrl-C of a waiting study stops its array (--no-wait leaves it running)
                if not job.done():
                    job.cancel(check=False)  # the task's run ends KILLED, its checkpoint stays for a rerun
            raise
        return [j.job_id for j in futures]


def submitted(jobs: list[Any], runs: list[Any]) -> None:
    """Called once the array is submitted (the tests use it to interrupt a task mid-run)."""

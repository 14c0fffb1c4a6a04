"""SLURM through submitit (``resnet-lab study STUDY --launcher submitit``): a study's trainings
as one job array, one task per run. This module holds the settings (the ``[slurm]`` table and the
flags) and the rules about the cluster; the launcher itself is ``launch.SubmititLauncher``.

Each task is a ``launch.TrainTask``: it trains its run with ``launch.train_runs`` like any other launcher,
and its ``checkpoint()`` (submitit's hook, called when SLURM preempts the task or its time limit
nears) resubmits the same task. The requeued task finds the run's last checkpoint and continues
the same MLflow run from it (``train.train``), so a run is never trained twice; what was trained
after the last checkpoint is recomputed, as after a ``kill -9``. The study's process waits for
the array (or, with ``--no-wait``, says how to finish later) and settles each outcome as the other
launchers do. The ``[slurm]`` table of a study file and the command's flags give the sbatch
settings (``Settings``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError

CLUSTERS = ("slurm", "local", "debug")
# [slurm] keys -> (type, what it is); flags override them.
KEYS = {"partition": (str, "the SLURM partition"), "time_min": (int, "the time limit of one task, minutes"),
        "gpus_per_task": (int, "GPUs per task"), "cpus_per_task": (int, "CPU cores per task"),
        "mem_gb": (float, "memory per task, GB"), "array_parallelism": (int, "tasks of the array running at once"),
        "setup": (list, "shell lines run before each task, e.g. module load or source .venv/bin/activate"),
        "sbatch": (dict, "extra sbatch parameters, e.g. {account = \"proj\", qos = \"normal\"}"),
        "folder": (str, "where submitit keeps its job files and logs (on the shared filesystem)")}


@dataclass(frozen=True)
class Settings:
    """One study's sbatch settings: the ``[slurm]`` table, then the command's flags."""

    partition: str | None = None
    time_min: int = 240
    gpus_per_task: int = 1
    cpus_per_task: int = 4
    mem_gb: float | None = None
    array_parallelism: int = 16
    setup: list[str] = field(default_factory=list)
    sbatch: dict[str, str | int] = field(default_factory=dict)
    folder: str = "submitit"

    def executor_parameters(self, cluster: str) -> dict[str, Any]:
        """submitit ``update_parameters`` keywords (the local/debug clusters ignore the slurm_ ones)."""
        params: dict[str, Any] = {"timeout_min": self.time_min, "gpus_per_node": self.gpus_per_task,
                                  "cpus_per_task": self.cpus_per_task, "tasks_per_node": 1, "nodes": 1}
        if cluster == "slurm":
            params |= {"slurm_array_parallelism": self.array_parallelism,
                       "slurm_additional_parameters": dict(self.sbatch)}
            params |= {"slurm_partition": self.partition} if self.partition else {}
            params |= {"mem_gb": self.mem_gb} if self.mem_gb else {}
            params |= {"slurm_setup": list(self.setup)} if self.setup else {}
        elif cluster == "local" and self.setup:
            params["local_setup"] = list(self.setup)
        return params


def parse_table(table: Any, where: str) -> Settings:
    """A study file's ``[slurm]`` table as Settings; any problem is one UserError naming the key."""
    if not isinstance(table, dict):
        raise UserError(f"{where}: slurm must be a table ([slurm]) of sbatch settings, got {table!r}")
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in KEYS:
            raise UserError(f"{where}: [slurm] unknown key {key!r}: the keys are {', '.join(KEYS)}")
        values[key] = _checked(key, value, f"{where}: [slurm] {key}")
    return Settings(**values)


def _checked(key: str, value: Any, where: str) -> Any:
    kind, what = KEYS[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise UserError(f"{where} must be {kind.__name__} ({what}), got {value!r}")
    if kind in (int, float) and value <= 0 and not (key == "gpus_per_task" and value == 0):
        raise UserError(f"{where} must be positive ({what}), got {value}")
    if kind is list and not all(isinstance(v, str) for v in value):
        raise UserError(f"{where} must be a list of strings ({what}), got {value!r}")
    if kind is dict and not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value.values()):
        raise UserError(f"{where} values must be strings or integers ({what}), got {value!r}")
    return value


def with_flags(settings: Settings, *, partition: str | None = None, time_min: int | None = None,
               gpus_per_task: int | None = None, array_parallelism: int | None = None,
               sbatch: list[str] | tuple[str, ...] = ()) -> Settings:
    """The study file's settings with the command's flags on top (each checked as in the file)."""
    flags = {"partition": partition, "time_min": time_min, "gpus_per_task": gpus_per_task,
             "array_parallelism": array_parallelism}
    changes = {k: _checked(k, v, f"--{k.replace('_', '-')}") for k, v in flags.items() if v is not None}
    extra = dict(settings.sbatch)
    for item in sbatch:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--sbatch expects KEY=VALUE (an sbatch option without its dashes), got {item!r}")
        extra[key.strip()] = value.strip()
    return dataclasses.replace(settings, **changes, sbatch=extra)


def check_tracking(uri: str, cluster: str) -> None:
    """A SLURM array writes from many nodes at once: only an MLflow server takes that. The local and
    debug clusters run on this machine, like --jobs, where SQLite's file locks work."""
    if cluster == "slurm" and not uri.startswith(("http://", "https://")):
        raise UserError("--launcher submitit --cluster slurm needs an MLflow tracking server (--tracking-uri "
                        "http://HOST:5000): tasks on many nodes writing one SQLite file on a shared filesystem "
                        "break its locks")


ACTIVE_STATES = ("PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
                 "SUSPENDED", "RESIZING", "STAGE_OUT", "SIGNALING")


def refuse_if_running(job_ids: str | None, cluster: str, folder: Path) -> None:
    """A rerun while the study's earlier array (``--no-wait``) still runs would train its runs twice:
    refuse it (SLURM; the local and debug clusters' tasks end with the study process that waits)."""
    if not job_ids or cluster != "slurm":
        return
    import submitit

    running = [j for j in job_ids.split(",") if submitit.SlurmJob(folder, j).state in ACTIVE_STATES]
    if running:
        raise UserError(f"array task(s) {', '.join(running[:5])} of this study are still queued or running "
                        f"(squeue -j {running[0]}); wait until they end (or scancel them), then rerun")

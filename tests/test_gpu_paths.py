"""The CUDA paths, checked on a CPU host (issue 15): what CUDA would return is faked (GPU
counts, RNG states, a window tensor that says it is on cuda:1, storages tagged cuda:1),
and each test states the failure it guards against.

The real-GPU counterparts are the ``*_on_cuda_*`` tests (skipped without CUDA) and
``benchmarks/gpu_smoke.sh``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow import MlflowClient

import resnet_lab.train as train_mod
from resnet_lab import launch
from resnet_lab import study as study_mod
from resnet_lab.checkpoint import FORMAT_VERSION, checkpoint_path, history_path, read_rows
from resnet_lab.checkpoint import load as load_checkpoint
from resnet_lab.cli import main
from resnet_lab.config import TrainConfig
from resnet_lab.errors import UserError
from resnet_lab.speed import plan
from resnet_lab.studyfile import load_scales
from resnet_lab.train import prepare, select_device, train


def _cfg(tracking_uri: str, experiment: str, **changes: object) -> TrainConfig:
    base = TrainConfig(model="resnet-8", dataset="synthetic", iterations=40, log_every=10, eval_every=40,
                       eval_batch_size=512, batch_size=32, tracking_uri=tracking_uri, experiment=experiment,
                       progress=False, device="cpu", checkpoint_every=0)
    return dataclasses.replace(base, **changes)


@pytest.fixture
def gpus(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Make this process see ``gpus.count`` CUDA devices (``torch.cuda.is_available`` true)."""
    class Gpus:
        count = 1

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: Gpus.count)
    return Gpus


# ---------------------------------------------------------------- item 1: CUDA RNG state on resume

class _OnGpu(torch.Tensor):
    """A CPU tensor that says it lives on ``cuda:<index>``: TrainState takes its CUDA branches."""

    __torch_function__ = torch._C._disabled_torch_function_impl  # results are plain tensors
    index: int | None = None

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return torch.device("cuda", self.index)


def _window_on(index: int | None) -> torch.Tensor:
    t = torch.Tensor._make_subclass(_OnGpu, torch.zeros(2))
    t.index = index
    return t


def _fake_cuda_rng(monkeypatch: pytest.MonkeyPatch, gpus: Any) -> list[tuple[int, torch.device | str | int]]:
    """Per-GPU RNG states as CUDA keeps them; setting one of a GPU this process cannot see is the
    IndexError ``set_rng_state_all`` raises with fewer GPUs. Returns the (state, device) sets."""
    sets: list[tuple[int, Any]] = []

    def index(device: Any) -> int:
        d = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
        return d.index or 0

    def get_rng_state(device: Any = "cuda") -> torch.Tensor:
        return torch.full((8,), 10 + index(device), dtype=torch.uint8)

    def set_rng_state(state: torch.Tensor, device: Any = "cuda") -> None:
        if index(device) >= gpus.count:
            raise IndexError("list index out of range")
        sets.append((int(state[0]), device))

    monkeypatch.setattr(torch.cuda, "get_rng_state", get_rng_state)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [get_rng_state(i) for i in range(gpus.count)])
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", set_rng_state)  # what set_rng_state_all calls
    return sets


def test_a_checkpoint_of_cuda_1_on_a_two_gpu_node_resumes_in_a_one_gpu_worker(
        tracking_uri: str, monkeypatch: pytest.MonkeyPatch, gpus: Any) -> None:
    """Written by a run on cuda:1 of a 2-GPU node; resumed where only that GPU is visible (its
    cuda:0): only the run's own GPU state is saved and it goes back to the run's GPU, no IndexError."""
    sets = _fake_cuda_rng(monkeypatch, gpus)
    state = train_mod.start([prepare(_cfg(tracking_uri, "rng"))]).states[0]
    gpus.count, state.window = 2, _window_on(1)
    saved = state.capture("run", "hash")
    gpus.count, state.window = 1, _window_on(0)
    state.restore(saved)
    assert sets == [(11, torch.device("cuda", 0))]  # cuda:1's state, put on the worker's only GPU


# ---------------------------------------------------------------- items 2 and 10: loading checkpoints

def _save_tagged(obj: object, path: Path, location: str) -> None:
    """``torch.save`` as a process on ``location`` writes it: every storage tagged ``location``."""
    entry = (0, lambda storage: location if storage.device.type == "cpu" else None, lambda s, loc: None)
    torch.serialization._package_registry.insert(0, entry)
    try:
        torch.save(obj, path)
    finally:
        torch.serialization._package_registry.remove(entry)


def test_a_checkpoint_written_on_cuda_1_loads_on_a_one_gpu_machine(tmp_path: Path, gpus: Any) -> None:
    path = tmp_path / "c.pt"
    _save_tagged({"version": FORMAT_VERSION, "stats": torch.tensor([1.0, 2.0])}, path, "cuda:1")
    with pytest.raises(RuntimeError):  # what a load onto the file's own device does here
        torch.load(path, weights_only=True)
    saved = load_checkpoint(path)
    assert saved["stats"].device.type == "cpu" and saved["stats"].tolist() == [1.0, 2.0]


_RAN: list[str] = []


def _record(what: str) -> str:
    _RAN.append(what)
    return what


class _Payload:
    """Unpickling this calls ``_record``: the code a shared checkpoint folder could smuggle in."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return _record, ("ran",)


def test_a_checkpoint_holding_an_arbitrary_object_is_refused_without_running_it(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    torch.save({"version": FORMAT_VERSION, "run_id": "x", "payload": _Payload()}, path)
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    assert not _RAN
    message = str(e.value)
    assert "\n" not in message and "_record" in message and "refused" in message and str(path) in message


def test_only_a_file_that_is_not_a_checkpoint_is_called_one_to_delete(tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    torch.save({"version": FORMAT_VERSION, "w": torch.ones(1000)}, good)
    torn, foreign, folder = tmp_path / "torn.pt", tmp_path / "foreign.pt", tmp_path / "folder.pt"
    torn.write_bytes(good.read_bytes()[:2000])
    foreign.write_bytes(b"not a checkpoint at all")
    folder.mkdir()  # the path exists but cannot be read as a file: the checkpoint may be fine elsewhere
    for bad in (torn, foreign):
        with pytest.raises(UserError, match="delete it"):
            load_checkpoint(bad)
    with pytest.raises(UserError) as e:
        load_checkpoint(folder)
    assert "cannot read checkpoint" in str(e.value) and "delete" not in str(e.value)


def test_checkpoints_the_loop_writes_load_with_weights_only(tracking_uri: str, tmp_path: Path, cpu_bf16: bool,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Everything a real checkpoint holds passes ``weights_only``; it names the device and the precision
    ``precision=auto`` picked (bf16 where the CPU has it), and its 10 grad-norm rows are in the rows file."""
    cfg = _cfg(tracking_uri, "weights-only", checkpoint_every=10, checkpoint_dir=str(tmp_path), iterations=20)
    _stop_at(monkeypatch, 15)
    with pytest.raises(RuntimeError, match="stop"):
        train(cfg)
    saved = torch.load(checkpoint_path(cfg), weights_only=True)
    assert saved["iteration"] == 10 and saved["probes"]["grad_count"] == 10 and saved["probes"]["grad_rows"] is None
    assert len(read_rows(history_path(checkpoint_path(cfg)), 10, saved["probes"]["grad_columns"])[0]) == 10
    assert (saved["device_type"], saved["precision"]) == ("cpu", "bf16" if cpu_bf16 else "fp32")


def _stop_at(monkeypatch: pytest.MonkeyPatch, iteration: int) -> None:
    real = train_mod.lr_at

    def lr_at(cfg: TrainConfig, it: int) -> float:
        if it == iteration:
            raise RuntimeError("stop")
        return real(cfg, it)

    monkeypatch.setattr(train_mod, "lr_at", lr_at)


# ---------------------------------------------------------------- item 2: select_device

@pytest.mark.parametrize("name", ["cuda:1", "cuda:x", "cudafoo", "cuda:"])
def test_a_device_that_is_not_here_is_one_line(name: str, gpus: Any) -> None:
    with pytest.raises(UserError) as e:
        select_device(name)
    assert "\n" not in str(e.value) and repr(name) in str(e.value)


def test_an_existing_gpu_is_selected(gpus: Any) -> None:
    gpus.count = 2
    assert select_device("cuda:1") == torch.device("cuda", 1)
    assert select_device("auto") == torch.device("cuda")


def test_cli_device_beyond_the_gpu_count_exits_2_and_creates_nothing(
        tmp_path: Path, gpus: Any, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "m.db"
    code = main(["train", "--model", "resnet-8", "--dataset", "synthetic", "--iterations", "10", "--no-progress",
                 "--device", "cuda:3", "--tracking-uri", f"sqlite:///{db}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "'cuda:3' does not exist" in err and "1 GPU" in err
    assert not db.exists()


# ---------------------------------------------------------------- item 5: no resume on another device type

def _killed_checkpoint(tracking_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                       experiment: str) -> tuple[TrainConfig, Path]:
    """A run stopped at iteration 15 (a FAILED run) and its checkpoint of iteration 10."""
    cfg = _cfg(tracking_uri, experiment, checkpoint_every=10, checkpoint_dir=str(tmp_path), iterations=20)
    with monkeypatch.context() as m:
        _stop_at(m, 15)
        with pytest.raises(RuntimeError, match="stop"):
            train(cfg)
    return cfg, checkpoint_path(cfg)


def _refused(cfg: TrainConfig, tracking_uri: str, path: Path) -> str:
    """The one-line refusal; the run and the checkpoint are left as they were."""
    client = MlflowClient(tracking_uri)
    (before,) = client.search_runs([client.get_experiment_by_name(cfg.experiment).experiment_id])
    with pytest.raises(UserError) as e:
        train(cfg)
    (after,) = client.search_runs([client.get_experiment_by_name(cfg.experiment).experiment_id])
    assert after.info.status == before.info.status == "FAILED" and path.exists()  # nothing touched
    assert "\n" not in str(e.value)
    return str(e.value)


def test_a_cuda_checkpoint_is_not_resumed_on_cpu(tracking_uri: str, tmp_path: Path, cpu_bf16: bool,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever this CPU picks, the message names both sides, and the device is what to change."""
    cfg, path = _killed_checkpoint(tracking_uri, tmp_path, monkeypatch, f"other-device-{int(cpu_bf16)}")
    torch.save(load_checkpoint(path) | {"device_type": "cuda", "precision": "bf16"}, path)  # as on a GPU
    here = plan(torch.device("cpu"), "auto", None, 20).precision
    assert here == ("bf16" if cpu_bf16 else "fp32")
    assert _refused(cfg, tracking_uri, path) == (
        f"checkpoint {path} was written on cuda in bf16, this run is on cpu in {here} (the device differs): resume "
        "it with --device cuda, or delete it to train afresh here")


def test_a_checkpoint_refused_for_its_precision_alone_says_how_to_resume_it(
        tracking_uri: str, tmp_path: Path, cpu_bf16: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Written on a CPU that picked the other precision: not "--device" (same device), nor --set precision
    (another config, another run), but the environment that makes auto pick it again; and that resumes."""
    cfg, path = _killed_checkpoint(tracking_uri, tmp_path, monkeypatch, f"other-precision-{int(cpu_bf16)}")
    here, other = ("bf16", "fp32") if cpu_bf16 else ("fp32", "bf16")
    torch.save(load_checkpoint(path) | {"precision": other}, path)  # as the other kind of CPU wrote it
    message = _refused(cfg, tracking_uri, path)
    has = "has" if cpu_bf16 else "has no"
    assert message == (f"checkpoint {path} was written on cpu in {other}, this run is on cpu in {here} "
                       f"(precision=auto picks {here} here: this CPU {has} native bf16): resume it with "
                       f"RESNET_LAB_CPU_BF16={int(other == 'bf16')} in the environment (bf16 without native units "
                       "is emulated: slower, same numbers), or delete it to train afresh here")
    run_id = load_checkpoint(path)["run_id"]
    monkeypatch.setenv("RESNET_LAB_CPU_BF16", str(int(other == "bf16")))
    result = train(cfg)
    assert (result.status, result.iterations, result.run_id) == ("FINISHED", 20, run_id)  # resumed, same run


# ---------------------------------------------------------------- item 6: throughput window

def test_images_per_s_leaves_out_the_checkpoint_write(tracking_uri: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake clock ticks 1 s per reading and 1000 s per checkpoint: each window must read 1 s."""
    clock = [0.0]

    class FakeTime:
        @staticmethod
        def perf_counter() -> float:
            clock[0] += 1.0
            return clock[0]

    real_checkpoint = train_mod.runlog.checkpoint

    def slow_checkpoint(*args: Any) -> None:
        real_checkpoint(*args)
        clock[0] += 1000.0

    monkeypatch.setattr(train_mod, "time", FakeTime)
    monkeypatch.setattr(train_mod.runlog, "checkpoint", slow_checkpoint)
    cfg = _cfg(tracking_uri, "window", checkpoint_every=10, checkpoint_dir=str(tmp_path), iterations=30)
    result = train(cfg)
    history = MlflowClient(tracking_uri).get_metric_history(result.run_id, "perf/images_per_s")
    assert sorted((m.step, m.value) for m in history) == [(s, 10 * 32 / 1.0) for s in (10, 20, 30)]


# ---------------------------------------------------------------- item 7: the scale of a Ray dry run

class _FakeRay:
    def __init__(self, gpus: float) -> None:
        self.gpus, self.closed = gpus, False

    def close(self) -> None:
        self.closed = True


def test_ray_dry_run_lists_the_scale_of_the_clusters_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A CPU-only driver of a GPU cluster: the dry run lists the full study, as the real run trains it."""
    path = tmp_path / "s.toml"
    path.write_text('name = "s"\ndepths = [8]\n[train]\ndataset = "synthetic"\niterations = 40\n'
                    "[cpu]\n[cpu.train]\niterations = 20\n")
    pools = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(launch.RayLauncher, "connect", classmethod(lambda cls, a, g: pools.append(_FakeRay(4)) or
                                                                   pools[-1]))
    study_mod.run_study(path, launcher="ray", dry_run=True, tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    out = capsys.readouterr().out
    assert "(full scale" in out and pools and pools[0].closed
    full = load_scales(path)["full"].runs
    assert all(f"config_hash {r.config_hash}" in out for r in full)


# ---------------------------------------------------------------- item 9: --devices workers see their GPU

class _FakeProcess:
    def __init__(self, target: Any, name: str, daemon: bool, args: tuple) -> None:
        self.cfg, self.pid, self.sentinel = args[2], 1, object()

    def start(self) -> None:
        self.env = os.environ.get("CUDA_VISIBLE_DEVICES")


class _FakeCtx:
    class _End:
        def close(self) -> None:
            pass

    Process = _FakeProcess

    def Pipe(self, duplex: bool) -> tuple[Any, Any]:
        return self._End(), self._End()


@pytest.mark.parametrize("visible, expect", [(None, "1"), ("4,6", "6")])
def test_a_devices_worker_sees_only_its_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            visible: str | None, expect: str) -> None:
    """``--devices 0,1``: the worker for GPU 1 gets CUDA_VISIBLE_DEVICES of that GPU and device cuda,
    so its current device is its GPU; our own environment is left as it was."""
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    path = tmp_path / "s.toml"
    path.write_text('name = "s"\ndepths = [8]\n[train]\ndataset = "synthetic"\n[cpu]\n')
    run = load_scales(path)["full"].runs[0]
    worker = launch._start_worker(_FakeCtx(), [run], "cuda:1", "parent", {}, threads=1)
    assert (worker.proc.env, worker.proc.cfg[0].device, worker.device) == (expect, "cuda", "cuda:1")
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == visible
    cpu = launch._start_worker(_FakeCtx(), [run], "cpu", "parent", {}, threads=1)
    assert (cpu.proc.env, cpu.proc.cfg[0].device) == (visible, "cpu")

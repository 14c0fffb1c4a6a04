"""One rule decides the device (resnet_lab.device), MPS's exceptions, and the gradient check
(``resnet-lab check-device``). No Apple hardware here: the MPS queries are monkeypatched, so
these tests check the rules and the refusals, not MPS kernels."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

import resnet_lab.devicecheck as devicecheck
from resnet_lab import launch
from resnet_lab import speed as speed_mod
from resnet_lab import study as study_mod
from resnet_lab.cli import main
from resnet_lab.config import TrainConfig
from resnet_lab.device import accelerator, auto_scale, select_device, sum_dtype
from resnet_lab.errors import UserError
from resnet_lab.probes import layer_responses

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch) -> Any:
    """What this process sees: ``machine.cuda`` GPUs and an MPS device when ``machine.mps``."""
    class Machine:
        cuda = 0
        mps = False
        macos14 = True

    monkeypatch.setattr(torch.cuda, "is_available", lambda: Machine.cuda > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: Machine.cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: Machine.mps)
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: Machine.macos14)
    return Machine


@pytest.mark.parametrize("cuda, mps, expect", [(1, True, "cuda"), (0, True, "mps"), (0, False, "cpu")])
def test_auto_picks_cuda_then_mps_then_cpu(machine: Any, cuda: int, mps: bool, expect: str) -> None:
    machine.cuda, machine.mps = cuda, mps
    assert accelerator() == expect and select_device("auto") == torch.device(expect)
    assert auto_scale(expect) == ("full" if expect == "cuda" else "cpu")  # an Apple GPU runs the [cpu] scale


def test_mps_is_a_device_name_and_refused_in_one_line_where_absent(machine: Any) -> None:
    TrainConfig(device="mps").validate()  # the form is valid everywhere
    machine.mps = True
    assert select_device("mps") == torch.device("mps")
    machine.mps = False
    with pytest.raises(UserError, match=r"^device 'mps' asked for but MPS .* not available here; use --device cpu"):
        select_device("mps")


def test_mps_speed_rules(machine: Any) -> None:
    """contiguous (BatchNorm backward is wrong in channels_last there), no auto compile, bf16 only on
    an MPS build that has it (macOS 14), refused in one line otherwise."""
    mps = torch.device("mps")
    s = speed_mod.plan(mps, "auto", None, 100_000)
    assert (s.memory_format, s.compile, s.precision) == (torch.contiguous_format, False, "bf16")
    assert speed_mod.plan(torch.device("cpu"), "fp32", None, 10).memory_format == torch.channels_last
    machine.macos14 = False
    assert speed_mod.plan(mps, "auto", None, 10).precision == "fp32"
    with pytest.raises(UserError, match="precision=bf16 on MPS needs macOS 14"):
        speed_mod.plan(mps, "bf16", None, 10)


def test_sums_are_float32_on_mps_and_as_exact_as_float64_here(monkeypatch: pytest.MonkeyPatch) -> None:
    """MPS has no float64: the probes' response statistics and the diagnostics' sums take
    ``sum_dtype``; forced to float32 (as on MPS) they agree with float64 to 1e-5."""
    assert sum_dtype("mps") == torch.float32 and sum_dtype("cpu") == torch.float64
    torch.manual_seed(0)
    from resnet_lab.models import build_model

    model = build_model("resnet-8", in_channels=3, num_classes=10)
    batches = [(torch.randn(64, 3, 16, 16), None) for _ in range(3)]
    wide = layer_responses(model, batches)
    import resnet_lab.probes as probes

    monkeypatch.setattr(probes, "sum_dtype", lambda device: torch.float32)
    narrow = layer_responses(model, batches)
    assert [n for n, _ in wide] == [n for n, _ in narrow]
    assert max(abs(a - b) / a for (_, a), (_, b) in zip(wide, narrow)) < 1e-5


def test_no_float64_is_made_on_the_device_outside_sum_dtype() -> None:
    """Every float64 tensor the diagnostics, probes and evaluation make on a device goes through
    ``sum_dtype`` (a literal float64 there would fail on MPS)."""
    files = [*(ROOT / "resnet_lab" / "diagnostics").glob("*.py"), ROOT / "resnet_lab" / "probes.py",
             ROOT / "resnet_lab" / "train.py"]
    offenders = [f"{f.name}:{i}" for f in files for i, line in enumerate(f.read_text().splitlines(), 1)
                 if re.search(r"torch\.float64|torch\.double|\.double\(\)", line) and "device" in line]
    assert offenders == []


# ---------------------------------------------------------------- --jobs N on every GPU (issue 25, 2.3)

def test_jobs_without_devices_spread_over_every_visible_gpu(machine: Any, tmp_path: Path, tracking_uri: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """``--jobs 4`` on a 2-GPU machine: the workers go to cuda:0 and cuda:1, not all to cuda:0."""
    machine.cuda = 2
    assert study_mod.worker_devices(None, 4, "cuda") == ["cuda:0", "cuda:1"]
    assert study_mod.worker_devices(None, 1, "cuda") == ["cuda"]  # inline: the current GPU
    assert study_mod.worker_devices(["cuda:1"], 4, "cuda") == ["cuda:1"]
    assert study_mod.worker_devices(None, 4, "cpu") == ["cpu"]
    path = tmp_path / "jobs.toml"
    path.write_text('name = "jobs_gpus"\ndepths = [8]\nseeds = [0, 1]\n[train]\ndataset = "synthetic"\n'
                    "iterations = 20\n[cpu]\n")
    seen, checked = {}, []
    monkeypatch.setattr(study_mod, "check_device", lambda name: checked.append(name) or "ok")
    monkeypatch.setattr(launch, "run_processes", lambda runs, *a: seen.update(jobs=a[-2], devices=a[-1]))
    study_mod.run_study(path, jobs=4, tracking_uri=tracking_uri, progress=False)
    assert seen == {"jobs": 4, "devices": ["cuda:0", "cuda:1"]} and checked == ["cuda:0"]


# ---------------------------------------------------------------- check-device

def test_check_device_passes_a_device_that_computes_what_the_cpu_does() -> None:
    gap, _ = devicecheck.gradient_gap(torch.device("cpu"))
    assert gap == 0.0
    assert main(["check-device", "--device", "cpu"]) == 0


def _wrong_device(monkeypatch: pytest.MonkeyPatch, machine: Any) -> None:
    """An 'mps' device that runs on the CPU and returns its BatchNorm gradients scaled, as a broken
    kernel would."""
    machine.mps = True
    real = devicecheck.step_gradients
    calls = []

    def step(model: Any, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        calls.append(device.type)
        grads = real(model, x, y, torch.device("cpu"))
        return grads if device.type == "cpu" else {k: g * (1.5 if ".bn" in k else 1.0) for k, g in grads.items()}

    monkeypatch.setattr(devicecheck, "step_gradients", step)


def test_check_device_refuses_wrong_gradients_in_one_line(machine: Any, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    _wrong_device(monkeypatch, machine)
    assert main(["check-device", "--device", "mps"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "device mps computes wrong gradients" in err and "bn" in err


def test_a_study_on_a_wrong_device_trains_nothing(machine: Any, monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The study checks the device once, before its store exists: exit 2, no store, no run."""
    _wrong_device(monkeypatch, machine)
    path = tmp_path / "s.toml"
    path.write_text('name = "wrongdev"\ndepths = [8]\n[train]\ndataset = "synthetic"\niterations = 20\n[cpu]\n')
    db = tmp_path / "m.db"
    assert main(["study", str(path), "--tracking-uri", f"sqlite:///{db}", "--no-progress"]) == 2
    assert "computes wrong gradients" in capsys.readouterr().err and not db.exists()

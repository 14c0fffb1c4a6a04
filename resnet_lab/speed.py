"""How a run's step goes fast on the device at hand: precision, memory layout, torch.compile, SGD form,
fusion.

``plan`` decides them once per run (``train.prepare``); the training step, the optimiser,
evaluation and the run's tags all read its answer, so a run never mixes precisions or layouts.
The CPU rules are measured, not assumed: the numbers behind them are in docs/benchmarks.md
("Precision, layout and compile on CPU"). The CUDA compile rule is OPEN: no GPU has measured it
yet (``benchmarks/gpu_smoke.sh`` prints the numbers that settle it).

``RESNET_LAB_CPU_BF16=1`` (or ``0``) answers the CPU bf16 question instead of the CPU: the test
suite pins it, so no test's verdict depends on the host's bf16 units (a forced "1" on a CPU
without them runs bf16 emulated: slower, and as exact).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn

from .errors import UserError

PRECISIONS = ("auto", "fp32", "bf16")
FUSE_CHOICES = ("auto", "on", "off")
# "reduce-overhead": inductor plus CUDA graphs over the step (one graph launch instead of ~25 kernel
# launches per block); "auto": reduce-overhead on CUDA, default elsewhere (CUDA graphs are CUDA only).
COMPILE_MODES = ("auto", "default", "reduce-overhead")
CPU_BF16_ENV = "RESNET_LAB_CPU_BF16"

# torch.compile pays for itself on CPU from this many training steps on. Measured on a 2-core AMD
# EPYC (AVX2), 1 thread, inductor's cache cold, resnet-20 at batch 128 (docs/benchmarks.md): the
# compile took 150-300 s of the first step on a heavily shared machine and saved 0.3-0.6 s of each
# ~4.5 s step there, i.e. ~500 steps to break even (both scale with the load); 1,000 leaves a margin
# for smaller batches (less saved per step) and for the noise of those measurements.
COMPILE_AFTER_ITERATIONS_CPU = 1000
# OPEN, a first guess that no GPU has measured (docs/benchmarks.md, "CUDA compile rule"): a resnet-20
# step is launch-bound on an H100, so CUDA graphs should save most of a ~10 ms eager step, and a
# compile costs ~1-2 min; 2,000 steps would repay it. gpu_smoke.sh prints the break-even it measures.
COMPILE_AFTER_ITERATIONS_CUDA = 2000
# Where the step model is compiled; tests swap in a counting backend (compiling for real takes minutes).
COMPILE_BACKEND: str | Callable = "inductor"

_log = logging.getLogger(__name__)


def native_bf16(device: torch.device) -> bool:
    """Does this device compute bf16 natively (so bf16 autocast is faster, not emulated)?

    CUDA: what torch reports (Ampere and later). MPS: bf16 needs macOS 14 (Metal 3.1); before it
    the MPS build refuses bf16 tensors. CPU: AMX tiles or AVX512-BF16, as torch reports them;
    elsewhere (e.g. AVX2-only CPUs) bf16 is converted to fp32 around every op.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "mps":
        return mps_bf16()
    if device.type != "cpu":
        return False
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return cpu_bf16_units()


def cpu_bf16_units() -> bool:
    """This CPU's own answer (AMX tiles or AVX512-BF16), whatever ``RESNET_LAB_CPU_BF16`` says."""
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


def mps_bf16() -> bool:
    """Does this MPS build compute bf16 (macOS 14 or newer)?"""
    return bool(torch.backends.mps.is_macos_or_newer(14, 0))


def cxx_missing() -> str | None:
    """The C++ compiler inductor needs for CPU kernels, when it is not on PATH (None: found)."""
    cxx = os.environ.get("CXX", "g++")
    return None if shutil.which(cxx) else cxx


@dataclass(frozen=True)
class Speed:
    """What ``plan`` decided for a run: autocast dtype (None: fp32), memory layout, compile and its mode."""

    device_type: str
    precision: str  # "fp32" or "bf16", never "auto"
    memory_format: torch.memory_format
    compile: bool
    compile_mode: str = "default"  # "default" or "reduce-overhead", never "auto"

    def autocast(self) -> AbstractContextManager:
        return torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=self.memory_format)

    def tags(self) -> dict[str, str]:
        layout = "channels_last" if self.memory_format == torch.channels_last else "contiguous"
        return {"precision": self.precision, "memory_format": layout, "compiled": str(self.compile).lower(),
                "compile_mode": self.compile_mode if self.compile else "none"}

    def sgd(self, params: Iterable[nn.Parameter], *, lr: float, momentum: float,
            weight_decay: float) -> torch.optim.SGD:
        """The run's SGD in the fastest form for its device that keeps its promises (``sgd_options``)."""
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                               **sgd_options(self.device_type))


def plan(device: torch.device, precision: str, compile: bool | None, iterations: int,
         compile_mode: str = "auto") -> Speed:
    """The one place that decides precision, layout and compile for a run of ``iterations`` on ``device``."""
    chosen = choose_precision(device, precision)
    return Speed(device.type, chosen, choose_memory_format(device), choose_compile(device, compile, iterations),
                 choose_compile_mode(device, compile_mode))


def choose_precision(device: torch.device, asked: str) -> str:
    """``auto``: bf16 autocast where the device computes bf16 natively, fp32 elsewhere. bf16 asked
    for on an MPS build without it is refused (its autocast would fail at the first step)."""
    if asked == "bf16" and device.type == "mps" and not mps_bf16():
        raise UserError("precision=bf16 on MPS needs macOS 14 or newer; use --set precision=fp32 (or auto)")
    if asked != "auto":
        return asked
    return "bf16" if native_bf16(device) else "fp32"


def choose_memory_format(device: torch.device) -> torch.memory_format:
    """channels_last everywhere it was measured: cuDNN's fast layout on CUDA; on CPU oneDNN's
    convolutions run in NHWC and skip a reorder per conv: 1.3x in fp32 and 2.2-2.4x with bf16
    on an AMX Xeon (issue 12), and 1.29-1.42x in fp32 on the 2-core AVX2 AMD EPYC for resnet-20
    and resnet-56 at batch 128 and resnet-20 at 64 (resnet-56 at 64: 1.06x, inside its noise; none
    slower; docs/benchmarks.md). A device kind measured slower in
    channels_last gets its exception here.

    MPS: contiguous, for correctness rather than speed: BatchNorm's backward computes wrong
    gradients for channels_last inputs there (PyTorch issue 175189, open).
    """
    return torch.contiguous_format if device.type == "mps" else torch.channels_last


def choose_compile(device: torch.device, asked: bool | None, iterations: int) -> bool:
    """``compile`` true/false forces it; unset (auto) compiles the step where it pays for its
    compile time: CPU runs of at least ``COMPILE_AFTER_ITERATIONS_CPU`` steps with a C++ compiler,
    CUDA runs of at least ``COMPILE_AFTER_ITERATIONS_CUDA`` steps (OPEN: not yet measured on a GPU).
    """
    if asked is not None:
        return asked
    if device.type == "cuda":
        return iterations >= COMPILE_AFTER_ITERATIONS_CUDA
    return device.type == "cpu" and iterations >= COMPILE_AFTER_ITERATIONS_CPU and cxx_missing() is None


def choose_fuse(device: torch.device, asked: str, nets: int, threads: int | None = None) -> bool:
    """Train a group of ``nets`` nets of one shape (``resnet_lab.fused.fusion_key``) as one fused model?

    ``on``/``off`` force it (a single net is never fused: there is nothing to fuse it with).
    ``auto`` fuses where fusing was measured faster (docs/benchmarks.md, "Fused training (issue 26)"):

    * CPU with 2+ intra-op ``threads`` (default: torch's current count): faster. K times fewer,
      K times larger ops mean K times fewer parallel regions to synchronise; the default study's
      training steps ran 1.09x faster fused on a quiet 2-core AMD EPYC in fp32 (2.6x on the same
      machine heavily shared), and issue 26's quiet 2-core Xeon micro-benchmark gave 1.1-1.25x.
    * CPU with 1 thread (e.g. ``--jobs 2`` on 2 cores): slower, 0.86x on the same machine: with no
      parallel region to save, the K times larger activations only cost cache. Not fused.
    * CUDA: not measured here (no GPU lent). Fused, on HFTA's evidence (Wang et al., MLSys 2021:
      several times the throughput for small CNNs on V100/A100) and issue 26's reading that a
      ResNet-20 step leaves a GPU launch-bound. ``benchmarks/fused_speed.py --device cuda`` is the
      measurement that should confirm or flip this.

    Fusion is exact either way (tests/test_fused.py), so a wrong guess costs speed, never results.
    """
    if nets < 2 or asked == "off":
        return False
    if asked == "on":
        return True
    if device.type == "cpu":
        return (torch.get_num_threads() if threads is None else threads) >= 2
    return device.type == "cuda"


def choose_compile_mode(device: torch.device, asked: str) -> str:
    """``auto``: CUDA graphs over the step (``reduce-overhead``) on CUDA, where a small net's step is
    launch-bound; inductor's ``default`` elsewhere (a CPU step is compute-bound and has no graphs)."""
    if asked != "auto":
        return asked
    return "reduce-overhead" if device.type == "cuda" else "default"


def sgd_options(device_type: str) -> dict[str, bool]:
    """The form of SGD the run uses. CUDA: ``fused`` (one kernel for all parameters instead of a few
    per parameter: the step is launch-bound there). CPU: the per-parameter loop, bit-identical to
    ``foreach``; torch's fused CPU kernel is a little faster (1.4 vs 1.7 ms of a resnet-20 step of
    seconds) but not bit-identical (its fused multiply-add: 1e-7 apart after 20 steps), and CPU runs
    are where the lab promises exact reruns and resumes (tests/test_speed.py checks both)."""
    return {"fused": True} if device_type == "cuda" else {"foreach": False} if device_type == "cpu" else {}


class CompiledStep:
    """The model ``torch.compile``'d for the training step, or eager if compiling fails.

    Each instance starts from fresh compiler caches: every net shares ``ResNet.forward``, so
    without a reset an inline study stops compiling after torch's recompile limit (8 nets)
    and silently runs eager (issue 15). A compile failure (no compiler, an inductor bug) costs
    one warning line, and the step runs eager from then on: compiling fails before the graph
    runs, so the batch is simply run again, eagerly.
    """

    def __init__(self, model: nn.Module, mode: str = "default") -> None:
        import torch._dynamo  # not imported with torch; seconds to import, so only when compiling

        torch._dynamo.reset()
        self.eager, self.graphs = model, mode == "reduce-overhead"
        options = {"mode": mode} if mode != "default" else {}
        self.fn: Callable[[torch.Tensor], torch.Tensor] = torch.compile(model, backend=COMPILE_BACKEND, **options)
        self.compiled = True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        try:
            if self.graphs and self.compiled:
                torch.compiler.cudagraph_mark_step_begin()  # a new step: the last step's graph outputs are done
            return self.fn(x)
        except torch._dynamo.exc.TorchDynamoException as e:  # inductor's errors derive from it too
            if not self.compiled:
                raise
            first = (str(e).strip().splitlines() or [""])[0][:200]
            _log.warning("torch.compile failed (%s: %s); training continues eager", type(e).__name__, first)
            self.fn, self.compiled = self.eager, False
            return self.fn(x)


def step_model(model: nn.Module, speed: Speed) -> nn.Module | CompiledStep:
    """What the training step calls: the model itself, or its compiled twin when ``speed.compile``."""
    return CompiledStep(model, speed.compile_mode) if speed.compile else model

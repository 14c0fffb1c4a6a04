"""Training images/s: a reference CIFAR loop vs the lab's own loop, same model, same process (issue 6).

* reference: the loop most CIFAR repos have (kuangliu/pytorch-cifar style): a Dataset that,
  like ``torchvision.datasets.CIFAR10``, turns an HWC uint8 array into a PIL image per item,
  torchvision ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip``, ``ToTensor``,
  ``Normalize``; ``DataLoader(batch 128, shuffle)``; fp32; ``loss.item()`` every step. It runs
  with every ``--ref-workers`` count and the fastest is the reference, so it is not
  handicapped by a worker count that suits another machine.
* lab: ``resnet_lab.data.DeviceLoader`` (uint8 split on the device, one-gather crop+flip),
  ``resnet_lab.models.build_model`` and the step of ``resnet_lab.train._loop`` (``train_step``)
  (``bench_common.lab_step``) with the default probes (weight-grad norms every step) and
  the loss/grad-norm read-back every 100 steps. One lab loop per variant: each of
  ``--precisions`` (fp32, bf16 autocast) x ``--formats`` (contiguous, channels_last), eager,
  and with ``--compile`` each also ``torch.compile``'d for the step (``--set compile=true``);
  the variant ``resnet_lab.speed.plan`` picks on its own (auto) for a default-length run is
  marked. Evaluation, MLflow logging and checkpoints are not timed (the reference has none).

Both use CIFAR-10-shaped synthetic uint8 data (``--images`` random 3x32x32 images, 10
classes; speed does not depend on content), batch 128, SGD(0.1, 0.9, 1e-4), the same
architecture built from the same seed; ``cudnn.benchmark`` is on for both (kuangliu sets
it too). Timing: after ``--warmup`` steps each, ``--windows`` rounds, each round one window
of ``--steps`` steps per loop between synchronised clocks, loop order rotating per round.
Batches a DataLoader prefetched while the other loops ran are taken off its queue, untimed,
before its window. Rates are medians over windows; lab/ref is the median over rounds of
the ratio within a round, so machine drift hits both alike. A compiled loop's first warm-up
step includes the compile: its seconds are the ``first_step_s`` column.

    python benchmarks/throughput.py [--device cpu|cuda] [--models ...] [--windows N] [--steps N]
                                    [--warmup N] [--ref-workers N ...] [--images N] [--compile]
                                    [--precisions fp32 bf16] [--formats contiguous channels_last]
                                    [--threads N] [--csv PATH] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T

from bench_common import (add_threads_option, device_name, header, lab_step, load, log_point, median, pick_devices,
                          set_threads, timed, write_csv)
from resnet_lab.checkpoint import TrainState
from resnet_lab.config import TrainConfig
from resnet_lab.data import IMAGE_SHAPE, DeviceLoader, Split
from resnet_lab.errors import UserError
from resnet_lab.models import build_model, parse_model_name
from resnet_lab.probes import Probes
from resnet_lab import speed as speed_mod
from resnet_lab.speed import CompiledStep, Speed, native_bf16, plan, step_model
from resnet_lab.studyfile import Study, load_scales

BATCH = 128
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
MODELS = ["resnet-20", "resnet-56", "resnet-110", "plain-56"]
EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
# Published training-set sizes and image sides, for runs given in epochs and for scaling a step's time
# from the CIFAR-shaped 32x32 batches measured here (a conv net's work grows with the pixels).
TRAIN_IMAGES = {"cifar10": 50_000, "fashion-mnist": 60_000, "synthetic": 2048}
DEFAULTS = {  # CPU: a whole run stays within ~5 min on 2 idle cores
    "cpu": dict(windows=3, steps=3, warmup=2, images=50_000, ref_workers=[0, 2]),
    "cuda": dict(windows=10, steps=50, warmup=30, images=50_000, ref_workers=[2, min(8, os.cpu_count() or 2)]),
}
QUICK = dict(windows=2, steps=2, warmup=1, images=4096)


class SyntheticCIFAR(torch.utils.data.Dataset):
    """What ``torchvision.datasets.CIFAR10.__getitem__`` does: HWC uint8 row -> PIL image -> transform."""

    def __init__(self, data: np.ndarray, targets: list[int], transform: T.Compose) -> None:
        self.data, self.targets, self.transform = data, targets, transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.data[i])), self.targets[i]


def endless(loader: DataLoader) -> Iterator:
    while True:
        yield from loader


class ReferenceLoop:
    def __init__(self, name: str, device: torch.device, split: Split, workers: int) -> None:
        self.label, self.workers, self.device = f"reference ({workers} workers)", workers, device
        transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                               T.Normalize(CIFAR_MEAN, CIFAR_STD)])
        data = split.images.permute(0, 2, 3, 1).contiguous().numpy()  # CIFAR10.data is [N, 32, 32, 3]
        dataset = SyntheticCIFAR(data, split.labels.tolist(), transform)
        self.loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=workers)
        self.batches = endless(self.loader)
        torch.manual_seed(0)
        self.model = build_model(name).to(device).train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        self.train_loss = 0.0

    def before_window(self) -> None:
        """Take off the batches the workers prefetched while other loops ran (untimed)."""
        if self.workers:
            for _ in range(self.workers * (self.loader.prefetch_factor or 2)):
                next(self.batches)

    def steps(self, n: int) -> None:
        for _ in range(n):
            inputs, targets = next(self.batches)
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            self.opt.zero_grad()
            outputs = self.model(inputs)
            loss = F.cross_entropy(outputs, targets)
            loss.backward()
            self.opt.step()
            self.train_loss += loss.item()


FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def variant_label(speed: Speed) -> str:
    layout = speed.tags()["memory_format"]
    mode = "" if speed.compile_mode == "default" else f" {speed.compile_mode}"
    return f"lab {speed.precision} {layout}" + (f" compiled{mode}" if speed.compile else "")


class LabLoop:
    def __init__(self, name: str, device: torch.device, split: Split, speed: Speed) -> None:
        self.label, self.workers, self.device, self.speed = variant_label(speed), None, device, speed
        self.cfg = TrainConfig(model=name)  # the defaults `resnet-lab train` runs with
        torch.manual_seed(0)
        self.model = build_model(name).to(device, memory_format=speed.memory_format).train()
        self.step_model = step_model(self.model, speed)
        c = self.cfg
        self.opt = speed.sgd(self.model.parameters(), lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
        loader = DeviceLoader(split, batch_size=BATCH, device=device, mean=CIFAR_MEAN, std=CIFAR_STD,
                              train=True, augment=c.augment, seed=c.seed)
        self.batches = loader.batches()
        probes = Probes(self.model, device=device, grad_every=c.grad_every, log_every=c.log_every, enabled=c.probes)
        self.state = TrainState(self.model, self.opt, loader, probes, window=torch.zeros(2, device=device))

    def before_window(self) -> None:
        pass

    def steps(self, n: int) -> None:
        for _ in range(n):
            lab_step(self.step_model, self.state, self.cfg, next(self.batches), self.speed)
            if self.state.iteration % self.cfg.log_every == 0:
                log_point(self.state)


def synthetic_split(n: int) -> Split:
    g = torch.Generator().manual_seed(0)
    return Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                 torch.randint(0, 10, (n,), generator=g))


def variants(device: torch.device, precisions: list[str], formats: list[str], compile_modes: list[str],
             eager: bool = True) -> list[Speed]:
    """Every precision x layout asked for, eager and compiled in each of ``compile_modes``, on ``device``."""
    runs = ([(False, "default")] if eager else []) + [(True, m) for m in compile_modes]
    return [Speed(device.type, p, FORMATS[f], c, m) for c, m in runs for p in precisions for f in formats]


def bench_model(name: str, device: torch.device, split: Split, *, windows: int, steps: int, warmup: int,
                ref_workers: list[int], speeds: list[Speed]) -> list[dict]:
    """One row per loop: images/s (median, min, max over windows); lab rows carry lab/ref."""
    loops = [ReferenceLoop(name, device, split, w) for w in ref_workers]
    loops += [LabLoop(name, device, split, speed) for speed in speeds]
    first_step: dict[str, float] = {}
    for loop in loops:
        first_step[loop.label] = timed(lambda: loop.steps(1), device) if warmup else float("nan")
        loop.steps(max(warmup - 1, 0))
        if isinstance(loop, LabLoop) and isinstance(loop.step_model, CompiledStep) and not loop.step_model.compiled:
            loop.label += " (compile failed: eager)"
            first_step[loop.label] = first_step[variant_label(loop.speed)]
    rates: dict[str, list[float]] = {loop.label: [] for loop in loops}
    for r in range(windows):
        for loop in loops[r % len(loops):] + loops[:r % len(loops)]:
            loop.before_window()
            rates[loop.label].append(steps * BATCH / timed(lambda: loop.steps(steps), device))
    refs = [loop for loop in loops if isinstance(loop, ReferenceLoop)]
    best = max(refs, key=lambda loop: median(rates[loop.label]))
    rows = []
    for loop in loops:
        rs = rates[loop.label]
        ratios = [a / b for a, b in zip(rs, rates[best.label])]
        sp = loop.speed if isinstance(loop, LabLoop) else None
        compiled = sp is not None and isinstance(loop.step_model, CompiledStep) and loop.step_model.compiled
        rows.append({"model": name, "device": device.type, "loop": loop.label, "workers": loop.workers,
                     "precision": sp.precision if sp else "fp32", "compiled": compiled,
                     "compile_mode": sp.compile_mode if sp and sp.compile else "",
                     "first_step_s": first_step[loop.label],
                     "images_per_s": median(rs), "min": min(rs), "max": max(rs), "windows": windows,
                     "steps": steps, "ratio_to_reference": median(ratios),
                     "ratio_q1": statistics.quantiles(ratios, n=4)[0] if len(ratios) > 1 else ratios[0],
                     "ratio_q3": statistics.quantiles(ratios, n=4)[2] if len(ratios) > 1 else ratios[0],
                     "is_reference": loop is best})
    return rows


def shipped_studies() -> list[Study]:
    """The full scale of every study in experiments/ (what ``make depth-study`` runs on a GPU)."""
    return [load_scales(path)["full"] for path in sorted(EXPERIMENTS.glob("*.toml"))]


def run_steps(cfg: TrainConfig) -> int:
    """A run's training steps: ``iterations``, or epochs x full batches of its training set."""
    if cfg.epochs is None:
        return cfg.iterations
    images = (cfg.train_size or TRAIN_IMAGES[cfg.dataset] - cfg.val_size)
    return cfg.epochs * (images // cfg.batch_size)


def step_scale(cfg: TrainConfig) -> float:
    """A run's step time over a measured 32x32, batch-128 step: batch and pixels (resize included)."""
    side = cfg.resize or IMAGE_SHAPE[cfg.dataset][1]
    return cfg.batch_size / BATCH * side * side / (32 * 32)


@dataclass
class Projection:
    study: str
    runs: int  # the study's runs at full scale (nets x seeds)
    projected: int  # runs whose model family was measured
    hours: float  # those runs' training steps, one after another
    scaled: list[str]  # models whose step time comes from the depth line, not a measurement
    missing: list[str]  # models of a family not measured at all: left out of ``hours``


def project(rates: dict[str, float], study: Study) -> Projection:
    """Hours for every run of ``study``, one after another, from measured img/s per model (batch 128, 32x32).

    Unmeasured depths: seconds/step from a least-squares line in depth through the measured models
    of the same family (both archs: the shortcut add is cheap), or proportional to depth from a single
    depth; then scaled by the run's batch and image size (``step_scale``). Training steps only
    (evaluation adds about 1-2 %).
    """
    sec = {m: BATCH / r for m, r in rates.items()}
    by_family: dict[str, dict[int, list[float]]] = {}
    for m, t in sec.items():
        spec = parse_model_name(m)
        by_family.setdefault(spec.family, {}).setdefault(spec.depth, []).append(t)

    def estimate(family: str, depth: int) -> float:
        depths = np.array(sorted(by_family[family]), dtype=float)
        times = np.array([np.mean(by_family[family][int(d)]) for d in depths])
        if len(depths) >= 2:
            slope, intercept = np.polyfit(depths, times, 1)
            return float(intercept + slope * depth)
        return float(times.mean() * depth / depths.mean())

    total, scaled, missing, projected = 0.0, [], [], 0
    for run in study.runs:
        spec = parse_model_name(run.cfg.model)
        if spec.name in sec:
            t = sec[spec.name]
        elif spec.depth in by_family.get(spec.family, {}):  # the other arch at this depth: the same convs
            t = float(np.mean(by_family[spec.family][spec.depth]))
        elif spec.family in by_family:
            t = estimate(spec.family, spec.depth)
            scaled.append(spec.name)
        else:
            missing.append(spec.name)
            continue
        total += t * step_scale(run.cfg) * run_steps(run.cfg)
        projected += 1
    return Projection(study.name, len(study.runs), projected, total / 3600, sorted(set(scaled)), sorted(set(missing)))


def projection_line(kind: str, where: str, p: Projection) -> str:
    note = f"; depth-scaled (not measured): {', '.join(p.scaled)}" if p.scaled else ""
    note += f"; not projected (family not measured): {', '.join(p.missing)}" if p.missing else ""
    return (f"projection, {kind} on {where}: {p.study} study ({p.projected} of {p.runs} runs, full scale, one after "
            f"another, training steps only) = {fmt_hours(p.hours)}{note}")


def bf16_capability(device: torch.device) -> str:
    """What the auto precision rule sees: native bf16 or not, and why."""
    if device.type == "cuda":
        return f"native {'yes' if native_bf16(device) else 'no'} (torch.cuda.is_bf16_supported)"
    amx, avx512 = torch.cpu._is_amx_tile_supported(), torch.cpu._is_avx512_bf16_supported()
    return (f"native {'yes' if native_bf16(device) else 'no'} (AMX tiles {'yes' if amx else 'no'}, AVX512-BF16 "
            f"{'yes' if avx512 else 'no'}; torch CPU capability {torch.backends.cpu.get_cpu_capability()})")


def fmt_hours(h: float) -> str:
    return f"{h * 60:.1f} min" if h < 1 else f"{h:.1f} h" if h < 48 else f"{h / 24:.1f} days"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], action="append",
                   help="repeatable; default: cpu, plus cuda when present")
    p.add_argument("--models", nargs="+", default=MODELS, help=f"default: {' '.join(MODELS)}")
    p.add_argument("--windows", type=int, help="timed windows per loop (default 3 on CPU, 10 on CUDA)")
    p.add_argument("--steps", type=int, help="steps per window (default 3 on CPU, 50 on CUDA)")
    p.add_argument("--warmup", type=int, help="untimed steps per loop first (default 2 on CPU, 30 on CUDA)")
    p.add_argument("--ref-workers", type=int, nargs="+",
                   help="DataLoader num_workers counts tried for the reference (default 0 2 on CPU, 2 8 on CUDA)")
    p.add_argument("--images", type=int, help="synthetic training images (default 50000)")
    p.add_argument("--compile", action="store_true",
                   help="also time each lab variant with its model torch.compile'd for the step (--set compile=true)")
    p.add_argument("--compile-modes", nargs="+", choices=["default", "reduce-overhead"],
                   help="with --compile: the torch.compile modes to time (default: default; reduce-overhead = CUDA "
                        "graphs over the step, --set compile_mode=reduce-overhead)")
    p.add_argument("--compiled-only", action="store_true", help="with --compile: leave out the eager lab variants")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend (default inductor; 'eager' traces without compiling: a plumbing check)")
    p.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"],
                   help="lab precisions to time (default both; bf16 is emulated, so slow, without native bf16)")
    p.add_argument("--formats", nargs="+", choices=list(FORMATS), default=list(FORMATS),
                   help="lab memory layouts to time (default both)")
    add_threads_option(p)
    p.add_argument("--csv", help="also write the rows to this CSV file")
    p.add_argument("--quick", action="store_true", help="smoke run: resnet-20, 2 windows of 2 steps, 4096 images")
    args = p.parse_args()
    try:
        for model in args.models:
            parse_model_name(model)
    except UserError as e:
        p.error(str(e))
    for key in ("windows", "steps", "images"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            p.error(f"--{key} must be >= 1")
    if args.warmup is not None and args.warmup < 0 or any(w < 0 for w in args.ref_workers or []):
        p.error("--warmup and --ref-workers must be >= 0")
    devices = pick_devices(args.device, "throughput")
    models = ["resnet-20"] if args.quick and args.models == MODELS else args.models
    set_threads(args.threads, p)
    torch.backends.cudnn.benchmark = True
    speed_mod.COMPILE_BACKEND = args.compile_backend

    print(header(devices))
    for dev in devices:
        print(f"bf16 on {dev.type}: {bf16_capability(dev)}")
    print(f"batch {BATCH}, CIFAR-10-shaped synthetic uint8 data; lab/ref = median over rounds of the "
          "within-round ratio to the fastest reference; q1-q3 = its quartiles")
    rows = []
    for dev in devices:
        opt = DEFAULTS[dev.type] | (QUICK if args.quick else {})
        opt |= {k: v for k, v in vars(args).items() if k in opt and v is not None}
        opt["ref_workers"] = sorted(set(opt["ref_workers"]))
        if opt["images"] < BATCH:  # loaders wrap epochs endlessly, so one batch is enough
            p.error(f"--images must be at least one batch ({BATCH})")
        split = synthetic_split(opt["images"])
        print(f"\n{dev.type}: {opt['images']} images, warm-up {opt['warmup']} steps, {opt['windows']} windows x "
              f"{opt['steps']} steps per loop, reference workers {opt['ref_workers']}")
        modes = (args.compile_modes or ["default"]) if args.compile else []
        speeds = variants(dev, args.precisions, args.formats, modes, eager=not (args.compile and args.compiled_only))
        auto = variant_label(plan(dev, "auto", None, TrainConfig().iterations))
        print(f"auto (resnet_lab.speed.plan, a default {TrainConfig().iterations}-iteration run): {auto}")
        print("\n| model | device | reference img/s (workers) | loop | img/s | lab/ref | q1-q3 | first step s |"
              "\n|---|---|---:|---|---:|---:|---|---:|")
        dev_rows = []
        for name in models:
            got = bench_model(name, dev, split, windows=opt["windows"], steps=opt["steps"], warmup=opt["warmup"],
                              ref_workers=opt["ref_workers"], speeds=speeds)
            ref = next(r for r in got if r["is_reference"])
            for lab in (r for r in got if r["workers"] is None):
                lab["auto"] = lab["loop"] == auto
                print(f"| {name} | {dev.type} | {ref['images_per_s']:.0f} ({ref['workers']}) | {lab['loop']}"
                      f"{' (auto)' if lab['auto'] else ''} | {lab['images_per_s']:.0f} | "
                      f"{lab['ratio_to_reference']:.2f} | {lab['ratio_q1']:.2f}-{lab['ratio_q3']:.2f} | "
                      f"{lab['first_step_s']:.1f} |", flush=True)
            dev_rows += [r | {"auto": r.get("auto", False)} for r in got]
        print("\nevery loop (img/s over windows):\n\n| model | device | loop | median | min | max | ratio to reference |"
              "\n|---|---|---|---:|---:|---:|---:|")
        for r in dev_rows:
            print(f"| {r['model']} | {r['device']} | {r['loop']} | {r['images_per_s']:.0f} | {r['min']:.0f} | "
                  f"{r['max']:.0f} | {r['ratio_to_reference']:.2f} |")
        kinds = [("reference", lambda r: r["is_reference"])]
        labs = dict.fromkeys(r["loop"] for r in dev_rows if r["workers"] is None)
        kinds += [(lab, lambda r, lab=lab: r["loop"] == lab) for lab in labs]
        for kind, pick in kinds:
            for study in shipped_studies():
                print(projection_line(kind, device_name(dev),
                                      project({r["model"]: r["images_per_s"] for r in dev_rows if pick(r)}, study)))
        rows += [r | {"device_name": device_name(dev), "torch": torch.__version__} for r in dev_rows]
    print(f"\n{load()} at end")
    if args.csv:
        write_csv(args.csv, rows)
        print(f"wrote {args.csv}")


if __name__ == "__main__":
    sys.exit(main())

"""How much do the probes slow a training step? Probes off vs on, resnet-20 and resnet-110 (issue 3).

Every config runs the lab's own step (``bench_common.lab_step``, the step of
``resnet_lab.train.train_step``: batch from ``DeviceLoader`` with crop+flip, lr set, forward,
cross-entropy, backward, ``probes.on_backward``, SGD step, loss/error sums on the device)
on one model and optimiser, batch 128 of CIFAR-10-shaped synthetic uint8 data:

* ``off``: ``Probes(enabled=False)``, as ``--set probes=false`` trains.
* ``grad norms every step``: ``Probes(grad_every=1)``, the default, with ``drain`` every
  100 steps as the loop does.
* ``grad flow every 100 steps``: ``off`` plus one ``gradient_flow`` call on a fixed batch
  per 100 steps, amortised: step + call / 100 (a short run never reaches step 100, so the
  call is timed on its own in ``--flow-reps`` of the rounds).

Timing: rounds of one window per config (``--window`` steps between synchronised clocks,
so on CUDA the host runs ahead of the GPU as in training), order alternating per round;
each ratio is the median over rounds of the ratio to the same round's ``off`` window, so
drift on a shared machine hits both sides. Two more rows time the probe calls alone
(``on_backward`` x50, one ``gradient_flow``) against an ``off`` step.

Precision and layout are what `resnet_lab.speed.plan` picks for the device (auto), as train.py; cudnn.benchmark on CUDA.

    python benchmarks/probe_overhead.py [--device cpu|cuda] [--rounds N] [--window N] [--warmup N]
                                        [--flow-reps N] [--models ...] [--csv PATH]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench_common import (add_threads_option, header, lab_step, load, log_point, median, pick_devices, set_threads,
                          sync, timed, write_csv)
from resnet_lab.checkpoint import TrainState
from resnet_lab.config import TrainConfig
from resnet_lab.data import DeviceLoader, Split
from resnet_lab.models import build_model
from resnet_lab.probes import Probes, gradient_flow
from resnet_lab.speed import plan

FLOW_EVERY = 100
BATCH = 128
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
DEFAULTS = {"cpu": dict(rounds=20, window=1, warmup=2, flow_reps=4),  # ~2 min on 2 idle cores
            "cuda": dict(rounds=30, window=20, warmup=3, flow_reps=10)}


def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def bench_model(name: str, device: torch.device, rounds: int, window: int, warmup: int,
                flow_reps: int) -> list[dict]:
    """One row per config: ms per step, median ratio to ``off`` over rounds, and its quartiles."""
    cfg = TrainConfig(model=name)  # lr/momentum/weight decay/log_every as a default training
    torch.manual_seed(0)
    speed = plan(device, cfg.precision, False, cfg.iterations)  # the auto precision and layout, eager
    model = build_model(name).to(device, memory_format=speed.memory_format).train()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(0)
    n = BATCH * 16
    split = Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                  torch.randint(0, 10, (n,), generator=g))
    loader = DeviceLoader(split, batch_size=BATCH, device=device, mean=CIFAR_MEAN, std=CIFAR_STD, train=True)
    batches = loader.batches()
    probe_x, probe_y = (t.to(device) for t in next(batches))  # the fixed batch gradient_flow sees
    probes = {"off": Probes(model, device=device, enabled=False),
              "norms": Probes(model, device=device, grad_every=1, log_every=cfg.log_every)}
    # one state per config: the same model, optimiser and batches, its own probes and metric window
    states = {k: TrainState(model, opt, loader, p, window=torch.zeros(2, device=device)) for k, p in probes.items()}

    def run(kind: str) -> None:
        state = states[kind]
        for _ in range(window):
            lab_step(model, state, cfg, next(batches), speed)
            if state.iteration % cfg.log_every == 0:
                log_point(state)

    def flow() -> None:
        gradient_flow(model, probe_x, probe_y)

    ratios: list[float] = []
    off_ms, on_ms, flow_ms, flow_ratio = [], [], [], []
    flow_rounds = set(range(0, rounds, max(1, rounds // max(flow_reps, 1)))[:flow_reps])
    for r in range(-warmup, rounds):
        order = ("off", "norms") if r % 2 == 0 else ("norms", "off")
        sec = {kind: timed(lambda: run(kind), device) / window for kind in order}
        if r == -warmup or r in flow_rounds:  # the first call warms the fp32 kernels up
            f = timed(flow, device)
            if r >= 0:
                flow_ms.append(f * 1e3)
                flow_ratio.append(f / sec["off"])
        if r >= 0:
            off_ms.append(sec["off"] * 1e3)
            on_ms.append(sec["norms"] * 1e3)
            ratios.append(sec["norms"] / sec["off"])
    # The probe call alone: immune to the noise that blurs a ~1 % difference in step time.
    calls = 50
    sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        probes["norms"].on_backward(states["norms"].iteration)
    sync(device)
    alone_ms = (time.perf_counter() - t0) / calls * 1e3
    off = median(off_ms)
    amortised = [1 + fr / FLOW_EVERY for fr in flow_ratio]
    rows = [("off", off, [1.0] * len(ratios)),
            ("grad norms every step", median(on_ms), ratios),
            (f"grad flow every {FLOW_EVERY} steps", off + median(flow_ms) / FLOW_EVERY, amortised),
            ("(one on_backward call alone)", alone_ms, [alone_ms / off]),
            ("(one gradient_flow call alone)", median(flow_ms), flow_ratio)]
    return [{"model": name, "device": device.type, "config": cfg_name, "ms_per_step": ms,
             "ratio_to_off": median(rs), "ratio_q1": quartiles(rs)[0], "ratio_q3": quartiles(rs)[1],
             "samples": len(rs)} for cfg_name, ms, rs in rows]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], action="append",
                   help="repeatable; default: cpu, plus cuda when present")
    p.add_argument("--models", nargs="+", default=["resnet-20", "resnet-110"])
    p.add_argument("--rounds", type=int, help="timed rounds (default 20 on CPU, 30 on CUDA)")
    p.add_argument("--window", type=int, help="steps per timed window (default 1 on CPU, 20 on CUDA)")
    p.add_argument("--warmup", type=int, help="untimed rounds first, >= 1 (default 2 on CPU, 3 on CUDA)")
    p.add_argument("--flow-reps", type=int, help="timed gradient_flow calls (default 4 on CPU, 10 on CUDA)")
    add_threads_option(p)
    p.add_argument("--csv", help="also write the rows to this CSV file")
    args = p.parse_args()
    for name in ("rounds", "window", "warmup", "flow_reps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    devices = pick_devices(args.device, "probe_overhead")
    set_threads(args.threads, p)
    torch.backends.cudnn.benchmark = True

    print(header(devices))
    print(f"batch {BATCH}, CIFAR-10-shaped synthetic uint8 data; ratio = median over rounds of "
          "(config / same round's off); q1-q3 = quartiles of those ratios")
    print("\n| model | device | config | ms/step | ratio to probes-off | q1-q3 |\n|---|---|---|---:|---:|---|")
    rows = []
    for dev in devices:
        d = DEFAULTS[dev.type]
        pick = lambda name: getattr(args, name) if getattr(args, name) is not None else d[name]  # noqa: E731
        for name in args.models:
            for row in bench_model(name, dev, pick("rounds"), pick("window"), pick("warmup"), pick("flow_reps")):
                rows.append(row)
                print(f"| {row['model']} | {row['device']} | {row['config']} | {row['ms_per_step']:.2f} | "
                      f"{row['ratio_to_off']:.4f} | {row['ratio_q1']:.4f}-{row['ratio_q3']:.4f} |", flush=True)
    print(f"\n{load()} at end")
    if args.csv:
        write_csv(args.csv, rows)
        print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()

"""Fused vs unfused training steps (issue 26): a study's nets of one shape as one model, or one at a time.

Two workloads, read from the study files (not hard-coded, since their scales change):

* ``default``: the default study's CPU scale (``experiments/fashion_mnist.toml``, ``[cpu]``): every
  run's net, grouped by ``resnet_lab.fused.fusion_key`` (plain and residual of one depth together),
  at the scale's batch size and the dataset's image size;
* ``paper``: one depth (``--paper-depth``, default 20) of ``experiments/cifar10_paper.toml``'s full
  scale: 5 seeds x plain/resnet = 10 nets, batch 128, 3x32x32.

A step is what training does for every net: forward, cross-entropy, backward, SGD (momentum 0.9,
wd 1e-4) on each net's own optimizer. Unfused: the nets one after the other. Fused: one
``FusedResNet`` forward of the stacked batches, the summed loss's backward, ``share_grads``, then
each net's SGD step. Layout and autocast as the lab trains (``resnet_lab.speed.plan``,
``--precision``); synthetic batches (speed does not depend on content). Data loading, probes,
evaluation and logging are not timed: they are the same per net either way.

Timing: ``--warmup`` steps of each, then ``--rounds`` rounds; in a round every group runs a window
of ``--steps`` steps fused and unfused, the order alternating from round to round. The speed-up of a
workload is the median over rounds of (sum of its groups' unfused seconds) / (sum of fused seconds):
its nets all train the same number of steps, so that is its whole training's ratio. Ratios within
a round share the machine's load, so they mean something on a shared machine even when the seconds
do not.

    python benchmarks/fused_speed.py [--device cpu|cuda] [--precision fp32|bf16] [--rounds N] [--steps N]
                                     [--warmup N] [--workloads default paper] [--paper-depth D] [--threads N]
                                     [--csv PATH] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from bench_common import add_threads_option, header, load, pick_devices, set_threads, timed, write_csv
from resnet_lab.config import TrainConfig
from resnet_lab.fused import FusedResNet, fusion_key
from resnet_lab.models import ResNet, build_model
from resnet_lab.speed import Speed, plan
from resnet_lab.studyfile import load_scales

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STUDY, PAPER_STUDY = ROOT / "experiments/fashion_mnist.toml", ROOT / "experiments/cifar10_paper.toml"
IMAGE = {"fashion-mnist": (1, 28), "synthetic": (1, 28), "cifar10": (3, 32)}  # channels, side (resnet_lab.data)
DEFAULTS = {"cpu": dict(rounds=5, steps=3, warmup=2), "cuda": dict(rounds=10, steps=30, warmup=20)}
QUICK = dict(rounds=1, steps=1, warmup=0)
QUICK_BATCH = 4  # --quick: a smoke run of every code path (batch 4, the default study's shallowest group,
QUICK_NETS = 2  # two of the paper depth's nets); its seconds mean nothing


@dataclass
class Group:
    """Nets of one fusion key, each with its own optimizer and batch, trained both ways in turn."""

    name: str
    nets: list[ResNet]
    opts: list[torch.optim.Optimizer]
    xs: list[torch.Tensor]
    ys: list[torch.Tensor]
    fused: FusedResNet

    def unfused_step(self, speed: Speed) -> None:
        for net, opt, x, y in zip(self.nets, self.opts, self.xs, self.ys):
            with speed.autocast():
                logits = net(speed.layout(x))
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    def fused_step(self, speed: Speed) -> None:
        with speed.autocast():
            logits = self.fused(torch.stack(self.xs))
        loss = sum(F.cross_entropy(logits[k], y) for k, y in enumerate(self.ys))
        for opt in self.opts:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        self.fused.share_grads()
        for opt in self.opts:
            opt.step()

    @property
    def images(self) -> int:
        return sum(len(y) for y in self.ys)


def build_groups(cfgs: list[TrainConfig], device: torch.device, speed: Speed, batch: int | None) -> list[Group]:
    """The runs' nets as the study builds them (seeded, then built), grouped by fusion key."""
    by_key: dict[tuple, list[tuple[TrainConfig, ResNet]]] = {}
    for cfg in cfgs:
        channels, side = IMAGE[cfg.dataset]
        torch.manual_seed(cfg.seed)
        net = build_model(cfg.model, in_channels=channels, num_classes=10, shortcut=cfg.shortcut)
        net = net.to(device, memory_format=speed.memory_format)
        key = fusion_key(net)
        if key is None:
            raise SystemExit(f"fused_speed.py: {cfg.model} (shortcut {cfg.shortcut}) is not fusable; "
                             "this benchmark times option-A studies")
        by_key.setdefault(key, []).append((cfg, net))
    groups = []
    for members in by_key.values():
        cfg0 = members[0][0]
        channels, side = IMAGE[cfg0.dataset]
        side, b = cfg0.resize or side, batch or cfg0.batch_size
        g = torch.Generator().manual_seed(0)
        nets = [n for _, n in members]
        opts = [torch.optim.SGD(n.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4) for n in nets]
        xs = [torch.randn(b, channels, side, side, generator=g).to(device) for _ in nets]
        ys = [torch.randint(0, 10, (b,), generator=g).to(device) for _ in nets]
        depth = nets[0].spec.depth
        name = f"depth {depth}: {len(nets)} nets ({', '.join(sorted({n.spec.arch for n in nets}))}), batch {b}, " \
               f"{channels}x{side}x{side}"
        groups.append(Group(name, nets, opts, xs, ys, FusedResNet(nets)))
    return groups


def paper_projection(fused_s: float, unfused_s: float, paper_depth: int) -> str:
    """The whole paper study's training time from one depth's step: steps cost about their depth
    (the nets are the same but for the number of blocks), every net trains the same iterations."""
    study = load_scales(PAPER_STUDY)["full"]
    iterations = study.runs[0].cfg.iterations
    scale = sum(study.depths) / paper_depth  # one group of nets per depth
    hours = {how: s * scale * iterations / 3600 for how, s in (("fused", fused_s), ("unfused", unfused_s))}
    return (f"projected paper-study training ({len(study.depths)} depths x {len(study.runs) // len(study.depths)} nets, "
            f"{iterations} steps; depth-{paper_depth} step time scaled by depth, an estimate): fused "
            f"{hours['fused']:.1f} h, unfused {hours['unfused']:.1f} h")


def workloads(paper_depth: int, quick: bool) -> dict[str, list[TrainConfig]]:
    default = [r.cfg for r in load_scales(DEFAULT_STUDY)["cpu"].runs]
    paper = [r.cfg for r in load_scales(PAPER_STUDY)["full"].runs if r.cfg.model.endswith(f"-{paper_depth}")]
    if not paper:
        raise SystemExit(f"fused_speed.py: {PAPER_STUDY.name} has no nets of depth {paper_depth}")
    if quick:
        first = min(int(c.model.split("-")[1]) for c in default)
        default = [c for c in default if c.model.endswith(f"-{first}")]
        paper = paper[:QUICK_NETS]
    return {"default": default, "paper": paper}


def time_workload(workload: str, groups: list[Group], settings: dict[str, int], speed: Speed,
                  device: torch.device) -> tuple[list[dict], list[float]]:
    """Warm up, then rounds of one window per group and way, the order alternating by round. Returns a
    row per group and round, and per round the workload's ratio (sum of unfused / sum of fused seconds)."""
    for g in groups:
        for _ in range(settings["warmup"]):
            g.fused_step(speed)
            g.unfused_step(speed)
    rows, ratios = [], []
    for r in range(settings["rounds"]):
        total = {"fused": 0.0, "unfused": 0.0}
        for g in groups:
            seconds = {}
            for how in (["fused", "unfused"] if r % 2 == 0 else ["unfused", "fused"]):
                step = g.fused_step if how == "fused" else g.unfused_step
                seconds[how] = timed(lambda: [step(speed) for _ in range(settings["steps"])], device) / settings["steps"]
                total[how] += seconds[how]
            rows.append(dict(workload=workload, group=g.name, nets=len(g.nets), round=r, device=device.type,
                             precision=speed.precision, fused_s_per_step=round(seconds["fused"], 5),
                             unfused_s_per_step=round(seconds["unfused"], 5),
                             speedup=round(seconds["unfused"] / seconds["fused"], 3),
                             fused_images_per_s=round(g.images / seconds["fused"], 1),
                             unfused_images_per_s=round(g.images / seconds["unfused"], 1)))
        ratios.append(total["unfused"] / total["fused"])
    return rows, ratios


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="fp32 (default: the project's CPU time budgets are for AVX2 machines) or bf16 autocast")
    p.add_argument("--rounds", type=int)
    p.add_argument("--steps", type=int, help="steps per timed window")
    p.add_argument("--warmup", type=int)
    p.add_argument("--workloads", nargs="+", choices=["default", "paper"], default=["default", "paper"])
    p.add_argument("--paper-depth", type=int, default=20)
    p.add_argument("--csv", help="write one row per workload, group and round here")
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run (batch 4, one round, fewer nets): timings meaningless")
    add_threads_option(p)
    args = p.parse_args()
    set_threads(args.threads, p)
    device = pick_devices([args.device], "fused_speed.py")[0]
    settings = DEFAULTS[device.type] | (QUICK if args.quick else {})
    settings |= {k: getattr(args, k) for k in ("rounds", "steps", "warmup") if getattr(args, k) is not None}
    if min(settings.values()) < 0 or settings["rounds"] < 1 or settings["steps"] < 1:
        p.error("--rounds and --steps must be >= 1, --warmup >= 0")
    speed = plan(device, args.precision, False, 1)
    print(header([device]))
    print(f"precision {speed.precision}, {speed.tags()['memory_format']}, eager; rounds {settings['rounds']}, "
          f"{settings['steps']} steps a window, {settings['warmup']} warm-up steps"
          + ("; QUICK: batch 4, fewer nets, timings meaningless" if args.quick else ""))

    rows: list[dict] = []
    for workload, cfgs in workloads(args.paper_depth, args.quick).items():
        if workload not in args.workloads:
            continue
        groups = build_groups(cfgs, device, speed, QUICK_BATCH if args.quick else None)
        mine, ratios = time_workload(workload, groups, settings, speed, device)
        rows += mine
        for g in groups:
            of = [r for r in mine if r["group"] == g.name]
            print(f"{workload:8s} {g.name}: fused {statistics.median(r['fused_s_per_step'] for r in of) * 1e3:8.1f} "
                  f"ms/step, unfused {statistics.median(r['unfused_s_per_step'] for r in of) * 1e3:8.1f} ms/step, "
                  f"speed-up {statistics.median(r['speedup'] for r in of):.2f}x (median over rounds)")
        print(f"{workload}: training {statistics.median(ratios):.2f}x faster fused (median over {len(ratios)} rounds; "
              f"per round {', '.join(f'{x:.2f}' for x in ratios)})", flush=True)
        if workload == "paper" and not args.quick:
            print(paper_projection(statistics.median(r["fused_s_per_step"] for r in mine),
                                   statistics.median(r["unfused_s_per_step"] for r in mine), args.paper_depth))
    print(f"{load()} at end")
    if args.csv:
        write_csv(args.csv, rows)


if __name__ == "__main__":
    sys.exit(main())

"""What do the four diagnostics of issue 16 cost per net? plain/resnet-20 and -56 on Fashion-MNIST.

* ``cpu`` scale: each diagnostic run as the CPU preset (``settings.CPU``) defines it, timed
  whole, once per net, plus the shattering depth sweep at init once (it is per study).
* ``full`` scale: ``--full extrapolate`` (default on CPU) times each diagnostic at the full
  preset's batch and point sizes on a small count and scales linearly by the work it leaves
  out (images, points, pairs, subsets, products); curvature is an upper bound with every
  power iteration running to 100. ``--full measure`` runs the full preset whole (a GPU).
* ``--compare-hvp``: a Hessian-vector product on resnet-8 (BN in eval mode, 128 images)
  from curvlinops' HessianLinearOperator against the lab's double backprop (``Hessian``): time per
  single product and per block of 8, and their relative difference.

Nets are untrained (seeded init; the landscape's "init" is another seed): the cost does not
depend on training except through the number of power iterations, so ``its`` is reported.

    python benchmarks/diagnostics_cost.py [--device cpu|cuda] [--models ...] [--scale cpu|full|both]
                                          [--full extrapolate|measure] [--compare-hvp] [--threads N] [--csv PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from bench_common import add_threads_option, header, load, pick_devices, set_threads, sync, write_csv
from resnet_lab.data import load_dataset
from resnet_lab.diagnostics import settings as S
from resnet_lab.diagnostics.common import (BN_IMAGES, CURVATURE_IMAGES, LANDSCAPE_IMAGES, LESION_IMAGES,
                                           SHATTERING_IMAGES, subset)
from resnet_lab.diagnostics.curvature import curvature, Hessian, hutchinson_trace, power_iteration
from resnet_lab.diagnostics.landscape import landscape
from resnet_lab.diagnostics.lesion import lesion
from resnet_lab.diagnostics.shattering import depth_sweep, shattering
from resnet_lab.models import build_model

MODELS = ("plain-20", "resnet-20", "plain-56", "resnet-56")
SMOKE = S.DiagnosticsSettings(  # --smoke: only checks that the script runs (tests/test_diagnostics_bench.py)
    lesion=S.LesionSettings(test_images=16, draws=1, batch_size=16),
    landscape=S.LandscapeSettings(train_images=8, line_points=2, grid=2, path_points=2, batch_size=8),
    curvature=S.CurvatureSettings(images=4, subsets=2, power_max_iterations=2, hutchinson_vectors=2, batch_size=4),
    shattering=S.ShatteringSettings(points=4, pairs=1, max_lag=1, bn_images=8, sweep_depths=(8,), sweep_seeds=1,
                                    batch_size=4))


CPU_SECONDS: list[float] = []  # process CPU time of each clock() call: on a loaded shared machine, with one
# thread, closer to what a quiet core would take than the wall time is


def clock(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    sync(device)
    CPU_SECONDS.append(time.process_time() - c0)
    return time.perf_counter() - t0, out


class Inputs:
    """The fixed subsets each diagnostic draws, sized for the largest request, on the device."""

    def __init__(self, data_name: str, device: torch.device) -> None:
        self.data = load_dataset(data_name, download=False)
        self.device = device

    def test(self, n: int, purpose: int = LESION_IMAGES) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.data
        return subset(d.test, n, seed=0, purpose=purpose, mean=d.mean, std=d.std, device=self.device)

    def train(self, n: int, purpose: int = LANDSCAPE_IMAGES) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.data
        return subset(d.train, n, seed=0, purpose=purpose, mean=d.mean, std=d.std, device=self.device)


def nets(name: str, inp: Inputs) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    d = inp.data
    torch.manual_seed(0)
    model = build_model(name, in_channels=d.in_channels, num_classes=d.num_classes).to(inp.device)
    torch.manual_seed(1)
    init = build_model(name, in_channels=d.in_channels, num_classes=d.num_classes).state_dict()
    return model, init


def run_whole(cfg: S.DiagnosticsSettings, model: nn.Module, init: dict, inp: Inputs) -> dict[str, tuple[float, str]]:
    """Seconds per diagnostic at ``cfg``, timed whole; the note says what was done."""
    dev, out = inp.device, {}
    x, y = inp.test(cfg.lesion.test_images)
    out["lesion"] = (clock(lambda: lesion(model, x, y, cfg.lesion), dev)[0], "")
    x, y = inp.train(cfg.landscape.train_images)
    out["landscape"] = (clock(lambda: landscape(model, init, x, y, cfg.landscape), dev)[0], "")
    c = cfg.curvature
    x, y = inp.train(c.images * c.subsets, purpose=CURVATURE_IMAGES)
    t, (df, _) = clock(lambda: curvature(model, x, y, c), dev)
    out["curvature"] = (t, f"its {'/'.join(str(i) for i in df.iterations)}")
    sh = cfg.shattering
    x, y = inp.test(2 * sh.pairs, SHATTERING_IMAGES)
    bn, _ = inp.train(sh.bn_images, purpose=BN_IMAGES)
    out["shattering"] = (clock(lambda: shattering(model, x, y, bn, sh), dev)[0], "one moment")
    return out


def passes(s: S.LandscapeSettings) -> int:
    """Forward passes over the subset: line (with +-0.5 and 0 added), grid, and path (BN re-estimate + eval)."""
    return len(set(torch.linspace(-1, 1, s.line_points).tolist()) | {-0.5, 0.0, 0.5}) + s.grid ** 2 + 2 * s.path_points


def full_extrapolated(model: nn.Module, init: dict, inp: Inputs) -> dict[str, tuple[float, str]]:
    """Full-preset cost from small runs at the full batch sizes, scaled linearly (see module doc)."""
    F_, dev, out = S.FULL, inp.device, {}
    le = dataclasses.replace(F_.lesion, test_images=F_.lesion.batch_size)
    x, y = inp.test(le.test_images)
    t = clock(lambda: lesion(model, x, y, le), dev)[0]
    out["lesion"] = (t * F_.lesion.test_images / le.test_images, f"x{F_.lesion.test_images // le.test_images} of one batch")
    la = dataclasses.replace(F_.landscape, train_images=F_.landscape.batch_size, line_points=2, grid=2, path_points=2)
    x, y = inp.train(la.train_images)
    t = clock(lambda: landscape(model, init, x, y, la), dev)[0]
    scale = passes(F_.landscape) / passes(la) * F_.landscape.train_images / la.train_images
    out["landscape"] = (t * scale, f"x{scale:.0f} of {passes(la)} passes")
    c = F_.curvature
    x, y = inp.train(c.batch_size, purpose=CURVATURE_IMAGES)
    H = Hessian(model, x, y, c.batch_size, nn.CrossEntropyLoss())
    g = torch.Generator().manual_seed(0)
    probe = dataclasses.replace(c, power_max_iterations=3, power_tolerance=1e-12)
    model.eval()
    t_pow = clock(lambda: power_iteration(H, probe, g, dev), dev)[0] / 3
    t_blk = clock(lambda: hutchinson_trace(H, c.hutchinson_block, c.hutchinson_block, g, dev), dev)[0]
    per_subset = c.images / c.batch_size * (c.power_max_iterations * t_pow + c.hutchinson_vectors / c.hutchinson_block * t_blk)
    out["curvature"] = (c.subsets * per_subset, f"upper bound: {c.power_max_iterations} its at {t_pow:.2f}s, "
                        f"{c.hutchinson_vectors // c.hutchinson_block} blocks at {t_blk:.2f}s")
    sh = dataclasses.replace(F_.shattering, pairs=1)
    x, y = inp.test(2)
    bn, _ = inp.train(sh.bn_images, purpose=BN_IMAGES)
    t = clock(lambda: shattering(model, x, y, bn, sh), dev)[0]
    out["shattering"] = (t * F_.shattering.pairs, f"x{F_.shattering.pairs} pairs, one moment")
    return out


def sweep(cfg: S.ShatteringSettings, inp: Inputs) -> float:
    x, y = inp.test(2 * cfg.pairs, SHATTERING_IMAGES)
    bn, _ = inp.train(cfg.bn_images, purpose=BN_IMAGES)
    d = inp.data
    return clock(lambda: depth_sweep(x, y, bn, cfg, in_channels=d.in_channels, num_classes=d.num_classes), inp.device)[0]


def compare_hvp(device: torch.device, reps: int) -> list[dict]:
    """curvlinops vs the lab's double-backprop HVP on resnet-8, eval-mode BN, 128 images.

    curvlinops-for-pytorch is not a dependency of the lab; this comparison is why (see
    resnet_lab/diagnostics/curvature.py). ``pip install curvlinops-for-pytorch`` to rerun it.
    """
    try:
        from curvlinops import HessianLinearOperator
    except ImportError:
        print("diagnostics_cost.py: --compare-hvp needs curvlinops-for-pytorch (pip install it)", file=sys.stderr)
        sys.exit(2)
    torch.manual_seed(0)
    model = build_model("resnet-8", in_channels=1).to(device).eval()
    x, y = torch.randn(128, 1, 28, 28, device=device), torch.randint(0, 10, (128,), device=device)
    H = HessianLinearOperator(model, nn.CrossEntropyLoss(), list(model.parameters()), [(x, y)],
                              check_deterministic=False)
    hand = Hessian(model, x, y, 128, nn.CrossEntropyLoss()).__matmul__
    V = torch.randn(H.shape[1], 8, device=device)

    rows = []
    for what, cols in (("single", V[:, :1]), ("block of 8", V)):
        for impl, fn in (("curvlinops", lambda c=cols: H @ c), ("lab (hand)", lambda c=cols: hand(c))):
            fn()  # warm-up (curvlinops sets up its functional model on the first product)
            times = [clock(fn, device)[0] for _ in range(reps)]
            rows.append(dict(what=f"hvp {what}", impl=impl, seconds=min(times), median=sorted(times)[reps // 2]))
        diff = ((H @ cols) - hand(cols)).norm() / hand(cols).norm()
        rows.append(dict(what=f"hvp {what}", impl="relative difference", seconds=float(diff), median=float(diff)))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", action="append", choices=["cpu", "cuda"])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--scale", choices=["cpu", "full", "both"], default="cpu")
    p.add_argument("--full", choices=["extrapolate", "measure"], help="default: measure on cuda, extrapolate on cpu")
    p.add_argument("--no-sweep", action="store_true", help="skip the shattering depth sweep")
    p.add_argument("--compare-hvp", action="store_true")
    p.add_argument("--hvp-reps", type=int, default=3)
    p.add_argument("--data", default="fashion-mnist", choices=["fashion-mnist", "synthetic"])
    p.add_argument("--smoke", action="store_true", help="a minuscule preset in place of the CPU one (tests only)")
    p.add_argument("--csv")
    add_threads_option(p)
    args = p.parse_args()
    set_threads(args.threads, p)
    devices = pick_devices(args.device, "diagnostics_cost.py")
    print(header(devices))
    rows: list[dict] = []
    cpu_cfg = SMOKE if args.smoke else S.CPU
    for dev in devices:
        if args.compare_hvp:
            rows += [dict(device=dev.type, scale="-", net="resnet-8", diagnostic=r["what"], seconds=r["seconds"],
                          note=f"{r['impl']} (min of {args.hvp_reps}; median {r['median']:.3g})") for r in compare_hvp(dev, args.hvp_reps)]
        inp = Inputs(args.data, dev)
        scales = ["cpu", "full"] if args.scale == "both" else [args.scale]
        for scale in scales:
            mode = "whole" if scale == "cpu" else args.full or ("measure" if dev.type == "cuda" else "extrapolate")
            for name in args.models:
                model, init = nets(name, inp)
                res = (run_whole(cpu_cfg if scale == "cpu" else S.FULL, model, init, inp) if mode in ("whole", "measure")
                       else full_extrapolated(model, init, inp))
                cpu_s = CPU_SECONDS[-len(res):] if mode == "whole" else [float("nan")] * len(res)
                for (diag, (sec, note)), cpu in zip(res.items(), cpu_s):
                    rows.append(dict(device=dev.type, scale=scale, net=name, diagnostic=diag, seconds=sec,
                                     note=f"{mode}{'; ' + note if note else ''}; process cpu {cpu:.1f} s"))
                    print(f"{dev.type:5} {scale:5} {name:10} {diag:11} {sec:9.2f} s  {rows[-1]['note']}", flush=True)
                if args.csv:  # rewritten after each net, so a stopped run keeps what it measured
                    write_csv(args.csv, rows)
            if not args.no_sweep and mode != "extrapolate":
                cfg = (cpu_cfg if scale == "cpu" else S.FULL).shattering
                rows.append(dict(device=dev.type, scale=scale, net=f"plain+resnet {'/'.join(map(str, cfg.sweep_depths))} "
                                 f"x{cfg.sweep_seeds} seeds", diagnostic="shattering_sweep", seconds=sweep(cfg, inp),
                                 note=f"{mode}; process cpu {CPU_SECONDS[-1]:.1f} s"))
    print(f"\n{'device':6} {'scale':5} {'net':28} {'diagnostic':16} {'seconds':>9}  note")
    for r in rows:
        print(f"{r['device']:6} {r['scale']:5} {r['net']:28} {r['diagnostic']:16} {r['seconds']:9.3g}  {r['note']}")
    for dev in devices:
        for scale in ("cpu", "full"):
            total = sum(r["seconds"] for r in rows if r["device"] == dev.type and r["scale"] == scale)
            if total:
                print(f"total {dev.type} {scale}: {total:.1f} s ({total / 60:.1f} min)")
    print(f"{load()} at end")
    if args.csv:
        write_csv(args.csv, rows)


if __name__ == "__main__":
    main()

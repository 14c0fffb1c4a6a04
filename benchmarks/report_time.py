"""How long does ``resnet-lab report`` take for a full-scale study? Target: under 30 s for 9 runs (issue 5).

Builds an MLflow store laid out like a finished ``cifar10_paper`` study at full scale (a
parent run and 9 child runs: plain 20/32/44/56, ResNet 20/32/44/56/110, 64k iterations,
``log_every`` 100, ``eval_every`` 2000, weight-gradient norms of every layer at every
iteration as in the default ``grad_every=1``), then times the report command end to end in
a fresh process (imports, loading, six figures as PNG + PDF, Markdown/HTML, logging to the
parent run), ``--repeats`` times, and once more in-process for a per-stage breakdown.

The store is the worst case the report meets: the same metric keys, parameters, tags and
probe tables (``resnet_lab.probes.tidy_table``, the writer training uses) as real runs, with
synthetic values, since only sizes and layout matter for timing. Building it takes ~2
minutes and ~600 MB; ``--store DIR`` keeps it for later runs (reused when it exists).

    python benchmarks/report_time.py [--store DIR] [--repeats N] [--iterations N] [--csv PATH]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench_common import header, load, write_csv

MODELS = ["plain-20", "plain-32", "plain-44", "plain-56", "resnet-20", "resnet-32", "resnet-44", "resnet-56",
          "resnet-110"]
STUDY = "cifar10_paper"
LOG, EVAL = 100, 2000
TARGET_S = 30.0


def build_store(root: Path, iterations: int, layer_metrics: bool = False) -> str:
    """A finished full-scale study in ``root/mlflow.db`` (+ ``root/mlartifacts``); returns its URI.

    Metric keys as training logs them: the probes' summaries (``Probes.drain``'s), or with
    ``layer_metrics`` one key per layer as well (``log_layer_metrics = true``, the layout before issue 14)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    from resnet_lab.config import TrainConfig
    from resnet_lab.models import build_model
    from resnet_lab.probes import (HEAD_INPUT, GradNormProbe, bn_layers, flow_summary, metric_name, response_layers,
                                   response_summary, tidy_table, weight_layers)
    from resnet_lab.tracking import get_or_create_experiment

    root.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = get_or_create_experiment(client, STUDY, uri)
    parent = client.create_run(exp, run_name=STUDY, tags={"kind": "study", "study": STUDY, "scale": "full"}).info.run_id
    client.log_text(parent, f'name = "{STUDY}"\n', f"study/{STUDY}.toml")
    rng = np.random.default_rng(0)
    steps = np.arange(LOG, iterations + 1, LOG)
    evals = np.r_[0, np.arange(EVAL, iterations + 1, EVAL)]
    for name in MODELS:
        t0 = time.perf_counter()
        model = build_model(name, in_channels=3, num_classes=10)
        depth = int(name.split("-")[1])
        cfg = TrainConfig(model=name, dataset="cifar10", iterations=iterations,
                          milestones=[iterations // 2, iterations * 3 // 4], val_size=5000)
        tags = {"kind": "train", "study": STUDY, "scale": "full", "mlflow.parentRunId": parent, "model": name,
                "arch": model.spec.arch, "depth": str(depth), "seed": "0", "device": "synthetic",
                "total_iterations": str(iterations), "config_hash": cfg.config_hash()}
        rid = client.create_run(exp, run_name=f"{name}-s0", tags=tags).info.run_id
        client.log_batch(rid, params=[Param(k, str(v)) for k, v in cfg.to_dict().items()][:100])
        weights, bns = [n for n, _ in weight_layers(model)], [n for n, _ in bn_layers(model)]
        blocks = [n for n, _ in model.named_blocks()] + [HEAD_INPUT]
        responses = [n for n, _ in response_layers(model)]
        grad_keys = [k for k, _ in GradNormProbe(model, device=torch.device("cpu")).summary(np.ones(len(weights) + 1))]
        point_keys = [k for k, _ in flow_summary([(b, 1.0) for b in blocks])]
        point_keys += [k for k, _ in response_summary([(r, 1.0) for r in responses])]
        if layer_metrics:
            grad_keys += [metric_name("grad_norm", n) for n in weights] + [metric_name("grad_norm_bn", n) for n in bns]
            point_keys += [metric_name("grad_flow", n) for n in blocks] + [metric_name("response_std", n) for n in responses]
        decay = np.exp(-steps / (iterations / 3))
        points: list[Metric] = []
        for ts, s in enumerate(steps.tolist(), 1):
            err = 30 * decay[ts - 1] + (3 if name.startswith("plain") else 1) + 0.001 * depth
            points += [Metric("train/error", err + rng.normal(0, 0.3), ts, s), Metric("train/loss", err / 30, ts, s),
                       Metric("lr", cfg.lr, ts, s), Metric("perf/images_per_s", 5000.0, ts, s)]
            points += [Metric(k, 1.0, ts, s) for k in grad_keys]
            if s % EVAL == 0:
                points += [Metric(f"{split}/{kind}", err + 6 if kind == "error" else err / 25, ts, s)
                           for split in ("test", "val") for kind in ("error", "loss")]
                points += [Metric(k, 1.0, ts, s) for k in point_keys]
        points += [Metric(f"final/{split}_error", err + (6 if split != "train" else 0), len(steps), 0)
                   for split in ("train", "test", "val")]
        for j in range(0, len(points), 1000):
            client.log_batch(rid, metrics=points[j:j + 1000])
        it = np.arange(iterations)
        nw, nb = len(weights), len(bns)
        norms = np.exp(rng.normal(0, 0.2, (iterations, nw + nb))) * (1 + np.exp(-it / 5000))[:, None]
        tables = {
            "grad_norms": tidy_table(list(it), norms, weights + bns, layer_index=[*range(nw), *range(nb)],
                                     group=["weight"] * nw + ["bn"] * nb),
            "grad_flow": tidy_table(list(evals), np.exp(rng.normal(0, 0.5, (len(evals), len(blocks)))), blocks),
            "responses": tidy_table(list(evals), np.abs(rng.normal(1, 0.3, (len(evals), len(responses)))), responses),
        }
        with tempfile.TemporaryDirectory() as tmp:
            for key, df in tables.items():
                df.to_parquet(Path(tmp) / f"{key}.parquet", index=False)
            client.log_artifacts(rid, tmp, "probes")
        client.set_terminated(rid, "FINISHED")
        print(f"  {name}: {len(tables['grad_norms']):,} grad-norm rows, {len(points):,} metric points, "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
    client.set_terminated(parent, "FINISHED")
    (root / "complete").write_text(f"{iterations}\n")
    return uri


def time_cli(uri: str, out: Path) -> float:
    """Wall seconds of ``resnet-lab report`` in a fresh process, as a user runs it."""
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "resnet_lab_command", "report", STUDY, "--tracking-uri", uri, "--out", str(out)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def breakdown(uri: str, out: Path) -> list[tuple[str, float]]:
    """Seconds per stage of one in-process report: load (and its parts), each figure on its own, all of
    them as the report draws them (``draw_figures``: one process per core), the documents, logging."""
    from analysis.document import build_report
    from analysis.figures import FIGURES, draw_figures, figure_jobs
    from analysis.report import log_report
    from analysis.runs import load_study

    t = time.perf_counter()
    study = load_study(STUDY, uri)
    rows = [("load", time.perf_counter() - t)] + [(f"  load: {k}", v) for k, v in study.timings.items() if k != "total"]
    figures = []
    for name, draw in FIGURES.items():
        t = time.perf_counter()
        figures.append(draw(study, out / "figures"))
        rows.append((f"figure {name}", time.perf_counter() - t))
    jobs = min(figure_jobs(), len(FIGURES))
    t = time.perf_counter()
    draw_figures(study, out / "figures", FIGURES, jobs=jobs)
    rows.append((f"figures: all {len(FIGURES)}, {jobs} process{'es' if jobs > 1 else ''}", time.perf_counter() - t))
    t = time.perf_counter()
    rep = build_report(study, out, figures=figures)
    rows.append(("report.md + report.html", time.perf_counter() - t))
    t = time.perf_counter()
    log_report(rep)
    rows.append(("log to the parent run", time.perf_counter() - t))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", type=Path, help="folder for the synthetic store (kept; reused when complete)")
    p.add_argument("--iterations", type=int, default=64000, help="iterations per run (default 64000, the paper's)")
    p.add_argument("--repeats", type=int, default=3, help="end-to-end report runs (default 3)")
    p.add_argument("--csv", help="write the timings to this CSV")
    p.add_argument("--layer-metrics", action="store_true", help="build the store with one metric key per layer too "
                                                                "(log_layer_metrics = true)")
    args = p.parse_args()
    if args.iterations < EVAL or args.repeats < 1:
        p.error(f"--iterations must be at least {EVAL} and --repeats at least 1")
    print(header([torch.device("cpu")]))
    with tempfile.TemporaryDirectory(prefix="report_time_") as tmp:
        root = args.store or Path(tmp) / "store"
        if (root / "complete").is_file() and (root / "complete").read_text().strip() == str(args.iterations):
            uri = f"sqlite:///{root / 'mlflow.db'}"
            print(f"store: reusing {root}")
        else:
            if root.exists() and any(root.iterdir()):
                p.error(f"--store {root} exists but holds no complete {args.iterations}-iteration store: "
                        "pass an empty or new folder")
            print(f"store: building {root} ({len(MODELS)} runs x {args.iterations:,} iterations)")
            t = time.perf_counter()
            uri = build_store(root, args.iterations, args.layer_metrics)
            print(f"store built in {time.perf_counter() - t:.0f} s")
        walls = [time_cli(uri, Path(tmp) / f"out{i}") for i in range(args.repeats)]
        stages = breakdown(uri, Path(tmp) / "out_breakdown")
    med = statistics.median(walls)
    print(f"\n`resnet-lab report {STUDY}` end to end, {len(MODELS)} runs: "
          f"{', '.join(f'{w:.1f}' for w in walls)} s; median {med:.1f} s "
          f"({'under' if med < TARGET_S else 'OVER'} the {TARGET_S:g} s target)")
    print("\nin-process breakdown (one run):")
    for name, sec in stages:
        print(f"  {name:<36} {sec:6.2f} s")
    print(f"{load()} at end")
    if args.csv:
        write_csv(args.csv, [{"what": "end_to_end", "repeat": i, "seconds": round(w, 3)} for i, w in enumerate(walls)]
                  + [{"what": name.strip(), "repeat": 0, "seconds": round(s, 3)} for name, s in stages])


if __name__ == "__main__":
    main()

"""The Python checks of benchmarks/gpu_smoke.sh, one function each (also called in-process by
tests/test_gpu_smoke.py, where starting a process costs more than the check).

    python benchmarks/smoke_checks.py resumed URI ITERATIONS LOG_EVERY
    python benchmarks/smoke_checks.py no-sync DEVICE DEPTH
    python benchmarks/smoke_checks.py fashion URI
    python benchmarks/smoke_checks.py summary WORK LOG CSV DEVICE
"""

from __future__ import annotations

import csv
import math
import statistics
import sys
from pathlib import Path

import torch
from mlflow import MlflowClient

from resnet_lab.config import TrainConfig
from resnet_lab.probes import SUMMARY_PREFIX
from resnet_lab.train import prepare, start, train_step

STEPS = 35


def resumed(uri: str, iterations: int, log_every: int) -> str:
    """The killed and resumed run is one FINISHED MLflow run with every log step once and its probes."""
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("smoke-resume").experiment_id])
    steps = sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss"))
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", [(r.info.run_name, r.info.status) for r in runs]
    assert steps == list(range(log_every, iterations + 1, log_every)), steps
    assert f"{SUMMARY_PREFIX}/grad_norm/total" in runs[0].data.metrics  # the probes ran
    return f"one FINISHED run {runs[0].info.run_id}, train/loss steps {steps[0]}..{steps[-1]} each once"


def no_sync(device: str, depth: int) -> str:
    """``STEPS`` training steps (the loader's batches included); on CUDA under sync debug mode
    "error", so any host sync in the step raises."""
    cfg = TrainConfig(model=f"resnet-{depth}", dataset="synthetic", iterations=STEPS, device=device, progress=False,
                      checkpoint_every=0, batch_size=128 if device == "cuda" else 32)
    setup = prepare(cfg)
    group = start([setup])
    state = group.states[0]
    batches = state.loader.batches()
    cuda = setup.device.type == "cuda"
    if cuda:
        torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(STEPS):
            train_step(group.model, [state], setup.cfg, [next(batches)], setup.speed)
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode(0)
    loss_sum, _ = state.window.tolist()
    return (f"{STEPS} steps on {device}{' under sync debug mode error' if cuda else ''}: iteration "
            f"{state.iteration}, mean loss {loss_sum / (STEPS * cfg.batch_size):.3f}")


def fashion(uri: str) -> str:
    """One RESULT line per Fashion-MNIST run: images/s (median of the windows after the first,
    which holds cuDNN's autotuning) and the final test error."""
    client = MlflowClient(uri)
    lines = []
    for run in client.search_runs([client.get_experiment_by_name("smoke-fashion").experiment_id]):
        rates = [m.value for m in client.get_metric_history(run.info.run_id, "perf/images_per_s")]
        rate = statistics.median(rates[1:] or rates)
        error, device = run.data.metrics["test/error"], run.data.tags["device"]
        lines.append(f"RESULT {run.info.run_name} on {device}: {rate:.0f} images/s, final test error {error:.2f} %, "
                     f"{run.data.tags['total_iterations']} iterations")
    return "\n".join(lines)


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def merge_timings(timings: Path, out: Path) -> list[dict[str, str]]:
    """Every CSV the steps wrote (one per benchmark run) as ONE CSV, a ``source`` column saying which."""
    rows = [{"source": p.stem} | r for p in sorted(timings.glob("*.csv")) for r in _rows(p)]
    if rows:
        fields = list(dict.fromkeys(k for r in rows for k in r))
        with out.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, restval="")
            w.writeheader()
            w.writerows(rows)
    return rows


def _variant(r: dict[str, str]) -> str:
    if r.get("is_reference") == "True":
        return "reference"
    mode = r.get("compile_mode") or "default"
    return f"{r['precision']} " + (f"compiled {mode}" if r.get("compiled") == "True" else "eager")


def compile_rule(rows: list[dict[str, str]], threshold: int) -> list[str]:
    """Per model and precision: what compiling saves a step, what it costs once (the first step's extra
    seconds), so from how many steps on it pays; and the rule that supports, against the current one."""
    lines, evens = [], []
    lab = [r for r in rows if r.get("workers", "") == "" and r.get("precision")]
    for r in lab:
        if r.get("compiled") != "True":
            continue
        eager = next((e for e in lab if e["model"] == r["model"] and e["precision"] == r["precision"]
                      and e.get("compiled") == "False" and e["source"] == r["source"]), None)
        if eager is None:
            continue
        t_e, t_c = 128 / float(eager["images_per_s"]), 128 / float(r["images_per_s"])
        cost = float(r["first_step_s"]) - float(eager["first_step_s"])
        even = cost / (t_e - t_c) if t_c < t_e else math.inf
        evens.append((r.get("compile_mode") or "default", even))
        lines.append(f"| {r['model']} | {_variant(r)} | {1000 * t_e:.2f} | {1000 * t_c:.2f} | {cost:.0f} | "
                     f"{'never' if math.isinf(even) else f'{even:,.0f}'} |")
    if not lines:
        return ["compile rule: no compiled timings in this run (steps compile, compile-deep)"]
    head = ["| model | variant | eager ms/step | compiled ms/step | compile s | pays after steps |",
            "|---|---|---:|---:|---:|---:|"]
    worst = {m: max(e for mm, e in evens if mm == m) for m, _ in evens}
    verdict = [f"compile rule these numbers support ({m}): " +
               ("never compile (not faster)" if math.isinf(e) else
                f"compile runs of at least {math.ceil(e):,} steps (the current rule: {threshold:,}, "
                f"{'supported' if e <= threshold else 'too low'})") for m, e in worst.items()]
    return head + lines + verdict


def projections(rows: list[dict[str, str]]) -> list[str]:
    """Every shipped study's full scale, one run after another, from the steps measured here."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import throughput

    groups: dict[str, dict[str, float]] = {}
    for r in rows:
        if r.get("images_per_s") and r.get("model") and (r.get("precision") or r.get("is_reference") == "True"):
            groups.setdefault(_variant(r), {})[r["model"]] = float(r["images_per_s"])
    studies = throughput.shipped_studies()
    lines = ["| loop | " + " | ".join(f"{s.name} ({len(s.runs)} runs)" for s in studies) + " |",
             "|---|" + "---:|" * len(studies)]
    for variant, rates in groups.items():
        cells = []
        for s in studies:
            p = throughput.project(rates, s)
            cells.append("family not measured" if not p.projected else
                         throughput.fmt_hours(p.hours) + ("" if not p.missing else f" ({p.projected} runs)"))
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return lines


def fused_lines(rows: list[dict[str, str]]) -> list[str]:
    """fused_speed.py's rows as it wrote them (its own columns), and the paper study projected per variant."""
    fused = [r for r in rows if r["source"] == "fused"]
    if not fused:
        return ["fused vs unfused: not run (no benchmarks/fused_speed.py, or it failed)"]
    cols = [k for k in fused[0] if k != "source"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r[k] for k in cols) + " |" for r in fused]
    key = next((k for k in ("variant", "loop", "kind", "fused", "mode") if k in cols), None)
    if key and "model" in cols and "images_per_s" in cols:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import throughput

        paper = next(s for s in throughput.shipped_studies() if s.name == "cifar10_paper")
        for variant in dict.fromkeys(r[key] for r in fused):
            rates = {r["model"]: float(r["images_per_s"]) for r in fused if r[key] == variant}
            p = throughput.project(rates, paper)
            lines.append(f"paper study ({p.projected} runs) projected, {key} {variant}: {throughput.fmt_hours(p.hours)}")
    return lines


def summary(work: str, log: str, out_csv: str, device: str) -> str:
    """The one table the smoke ends with: checks, images/s, projections, the compile rule, fused."""
    from resnet_lab.speed import COMPILE_AFTER_ITERATIONS_CPU, COMPILE_AFTER_ITERATIONS_CUDA

    work_dir = Path(work)
    steps = dict(line.split("|", 1) for line in (work_dir / "steps.txt").read_text().splitlines()) \
        if (work_dir / "steps.txt").exists() else {}
    results = [line[len("RESULT "):] for line in Path(log).read_text().splitlines() if line.startswith("RESULT ")]
    rows = merge_timings(work_dir / "timings", Path(out_csv))
    out = [f"=== resnet_lab smoke summary ({device})", "| check | result |", "|---|---|"]
    names = {"tests": "CUDA tests", "kill": "kill -9 after a checkpoint", "refuse": "CUDA checkpoint refused on CPU",
             "resume": "resumed: one FINISHED run, every step once", "sync": "host syncs in the step (none allowed)",
             "study": "2-run study, --jobs 2", "fashion": "real Fashion-MNIST"}
    for key, name in names.items():
        status = steps.get(key, "not run").split()[0] if key in steps else "not run"
        detail = next((r for r in results if r.startswith(("CUDA tests" if key == "tests" else "\0"))), "")
        out.append(f"| {name} | {status}{(': ' + detail.split(': ', 1)[1]) if detail else ''} |")
    out += [r for r in results if not r.startswith("CUDA tests")]
    lab = [r for r in rows if r["source"] in ("eager", "compile", "compile-deep") and r.get("images_per_s")]
    out += ["", "images/s, the lab vs the reference loop (batch 128, 32x32, channels_last):",
            "| model | loop | img/s | lab/ref | first step s |", "|---|---|---:|---:|---:|"]
    out += [f"| {r['model']} | {_variant(r)} | {float(r['images_per_s']):.0f} | {float(r['ratio_to_reference']):.2f} | "
            f"{float(r['first_step_s']):.1f} |" for r in lab]
    out += ["", "projected wall time of every shipped study's full scale (training steps, one run after another):"]
    out += projections(lab) if lab else ["(no throughput rows)"]
    threshold = COMPILE_AFTER_ITERATIONS_CUDA if device == "cuda" else COMPILE_AFTER_ITERATIONS_CPU
    out += [""] + compile_rule(lab, threshold) + [""] + fused_lines(rows)
    out.append(f"timings: {out_csv if rows else '(none)'} ({len(rows)} rows)")
    return "\n".join(out)


if __name__ == "__main__":
    name, *args = sys.argv[1:]
    if name == "resumed":
        print(resumed(args[0], int(args[1]), int(args[2])))
    elif name == "no-sync":
        print(no_sync(args[0], int(args[1])))
    elif name == "fashion":
        print(fashion(args[0]))
    elif name == "summary":
        print(summary(*args))
    else:
        sys.exit(f"unknown check {name}: use resumed, no-sync, fashion or summary")

"""The Python checks of benchmarks/gpu_smoke.sh, one function each (also called in-process by
tests/test_gpu_smoke.py, where starting a process costs more than the check).

    python benchmarks/smoke_checks.py resumed URI ITERATIONS LOG_EVERY
    python benchmarks/smoke_checks.py no-sync DEVICE DEPTH
    python benchmarks/smoke_checks.py fashion URI
"""

from __future__ import annotations

import statistics
import sys

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


if __name__ == "__main__":
    name, *args = sys.argv[1:]
    if name == "resumed":
        print(resumed(args[0], int(args[1]), int(args[2])))
    elif name == "no-sync":
        print(no_sync(args[0], int(args[1])))
    elif name == "fashion":
        print(fashion(args[0]))
    else:
        sys.exit(f"unknown check {name}: use resumed, no-sync or fashion")

"""Probes that show what the identity shortcut does: gradient norms, gradient flow, layer responses.

He et al. 2016 argue that deep plain nets degrade because they are hard to optimise, not
because gradients vanish (BN keeps them healthy), and that residual layers respond with
smaller signals (Fig. 7). These probes measure both claims while training runs:

* ``GradNormProbe``: L2 norm of every conv/linear weight gradient (and each BN layer's
  gamma+beta) every ``grad_every`` steps, on the device, with no host sync per step.
* ``gradient_flow``: ||dL/dx|| at the input of every block on a fixed batch.
* ``layer_responses``: std of each 3x3 conv's output after BN (He et al. Fig. 7).

``Probes`` ties them to the training loop: ``on_backward`` every step, ``measure`` at each
probe point (initialisation, each evaluation, the end), ``drain`` for MLflow,
``tables``/``write_tables`` for the full history.

What goes to MLflow is a handful of summaries per probe (``summary_names``): the MLflow UI
draws one chart card per metric key, so one key per layer (about 390 for a 110-layer net)
buries the error curves. Every layer's history stays in the tables; ``layer_metrics=True``
logs the per-layer keys as well.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError
from .models import ResNet, device_of

HEAD_INPUT = "head/input"
# The summaries' key prefix. MLflow's chart view groups keys into sections by what comes before
# their last "/" and sorts the sections by name (ASCII: "final" < "test" < "train" < "val" < "z...",
# keys without "/" last): under "z_probes/" the probes' charts come after the error curves.
SUMMARY_PREFIX = "z_probes"
GROUPS = ("weight", "bn")
Batch = tuple[torch.Tensor, torch.Tensor]


def metric_name(prefix: str, layer_name: str) -> str:
    """``("grad_norm", "stage1.block0.conv1") -> "grad_norm/stage1/block0.conv1"``.

    The first dotted part becomes a path level so the MLflow UI groups metrics by stage.
    """
    head, _, rest = layer_name.partition(".")
    return f"{prefix}/{head}/{rest}" if rest else f"{prefix}/{head}"


def stage_of(layer_name: str) -> str | None:
    """``"stage2.block0.conv1" -> "stage2"``; None for the stem and the head."""
    head = layer_name.partition(".")[0]
    return head if head.startswith("stage") else None


def _stage_groups(names: list[str]) -> dict[str, list[int]]:
    """Stage -> the column indices of its layers, in forward order."""
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        if (stage := stage_of(name)) is not None:
            groups.setdefault(stage, []).append(i)
    return groups


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Conv and linear weights in forward order (module registration order is forward order)."""
    return [(n, m.weight) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def bn_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def response_layers(model: ResNet) -> list[tuple[str, nn.Module]]:
    """(conv name, the BN right after it) for the stem conv and every block's two 3x3 convs."""
    layers: list[tuple[str, nn.Module]] = [("stem.conv", model.stem.bn)]
    for name, block in model.named_blocks():
        layers += [(f"{name}.conv1", block.bn1), (f"{name}.conv2", block.bn2)]
    return layers


class GradNormProbe:
    """Per-layer weight-gradient norms, kept on the device until ``flush``.

    Each measured step writes one row of a preallocated device buffer: one fused
    ``_foreach_norm`` over all grads, then a few tiny kernels for the BN pairing and the
    totals. Nothing is read back until ``flush``, so the GPU queue never stalls. A full
    buffer is set aside whole and a fresh one allocated: rows are never dropped or copied.
    Row layout: [weights..., weight total, bn layers..., bn total].
    """

    def __init__(self, model: nn.Module, *, device: torch.device, grad_every: int = 1, capacity: int = 101) -> None:
        if grad_every < 1 or capacity < 1:
            raise UserError(f"grad_every ({grad_every}) and capacity ({capacity}) must be >= 1")
        self.grad_every, self.capacity = grad_every, capacity
        self.weight_names = [n for n, _ in weight_layers(model)]
        # the main path's convs (no projection shortcuts), for the first/middle/last summaries
        self._main_convs = [i for i, (n, p) in enumerate(weight_layers(model)) if p.dim() == 4 and "shortcut" not in n]
        self._stages = _stage_groups(self.weight_names)
        self.bn_names = [n for n, _ in bn_layers(model)]
        self._params = [p for _, p in weight_layers(model)]
        self._params += [p for _, bn in bn_layers(model) for p in (bn.weight, bn.bias)]
        self._zero = torch.zeros(1, device=device)  # stands in for a grad that is None
        self._ncols = len(self.weight_names) + len(self.bn_names) + 2
        self._buf = torch.empty(capacity, self._ncols, device=device)
        self._full: list[torch.Tensor] = []  # buffers filled since the last flush
        self._pending_iters: list[int] = []
        self._host: list[np.ndarray] = []  # flushed rows, float32 [rows, ncols]
        self.iterations: list[int] = []  # iteration of each flushed row

    def record(self, iteration: int) -> None:
        """Call after ``backward()`` and before ``optimizer.step()``; measures every ``grad_every``-th."""
        if iteration % self.grad_every:
            return
        row_idx = len(self._pending_iters) - len(self._full) * self.capacity
        if row_idx == self.capacity:
            self._full.append(self._buf)
            self._buf = torch.empty_like(self._buf)
            row_idx = 0
        grads = [self._zero if p.grad is None else p.grad for p in self._params]
        norms = torch.stack(torch._foreach_norm(grads)).float()
        nw = len(self.weight_names)
        w, b = norms[:nw], norms[nw:].view(-1, 2).norm(dim=1)  # one norm over gamma and beta
        self._buf[row_idx].copy_(torch.cat([w, w.norm().view(1), b, b.norm().view(1)]))
        self._pending_iters.append(iteration)

    def flush(self) -> None:
        """Move every pending row to the host: one device-to-host read."""
        if not self._pending_iters:
            return
        n_last = len(self._pending_iters) - len(self._full) * self.capacity
        self._host.append(torch.cat([*self._full, self._buf[:n_last]]).cpu().numpy())
        self.iterations += self._pending_iters
        self._full, self._pending_iters = [], []

    def rows(self) -> np.ndarray:
        """All measured rows so far, flushed; shape [len(iterations), ncols]."""
        self.flush()
        if len(self._host) != 1:  # concatenate once and keep, so repeated calls stay cheap
            self._host = [np.concatenate(self._host) if self._host else np.zeros((0, self._ncols), np.float32)]
        return self._host[0]

    def latest(self) -> tuple[int, np.ndarray] | None:
        """(iteration, row) of the last measured step, flushed; None before the first."""
        self.flush()
        return (self.iterations[-1], self._host[-1][-1]) if self.iterations else None

    def summary(self, row: np.ndarray) -> list[tuple[str, float]]:
        """The weight-gradient norms worth a chart each: the first conv (the stem: what reaches the
        input end), each stage's norm (over all its weights) and the total. Row layout as in the class
        doc. Five keys for a 4-stage net, so an ImageNet-family run with a val split and the
        diagnostics still fits the 30-key budget; every layer is in the probe tables."""
        key = f"{SUMMARY_PREFIX}/grad_norm"
        out = [(f"{key}/first_conv", float(row[self._main_convs[0]]))]
        out += [(f"{key}/{stage}", float(np.linalg.norm(row[cols]))) for stage, cols in self._stages.items()]
        return out + [(f"{key}/total", float(row[len(self.weight_names)]))]

    def metric_names(self) -> list[str]:
        """MLflow names for the columns of a row (one per layer, with ``log_layer_metrics``)."""
        return ([metric_name("grad_norm", n) for n in self.weight_names] + ["grad_norm/total"]
                + [metric_name("grad_norm_bn", n) for n in self.bn_names] + ["grad_norm_bn/total"])


@contextmanager
def _probe_mode(model: nn.Module, *, train: bool) -> Iterator[None]:
    """Set train/eval for a probe and put back every module's flag and every buffer afterwards.

    Restoring buffers bitwise (BN running stats, num_batches_tracked) makes a train-mode
    probe invisible to training; restoring per-module flags keeps e.g. frozen BNs frozen.
    """
    flags = [(m, m.training) for m in model.modules()]
    saved = [(b, b.detach().clone()) for b in model.buffers()] if train else []
    model.train(train)
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag
        with torch.no_grad():
            for b, copy in saved:
                b.copy_(copy)


def gradient_flow(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[tuple[str, float]]:
    """||dL/dx|| at every block input in forward order, then at the head input (``head/input``).

    L is the mean cross-entropy on (x, y), BN in train mode as in a training step, fp32.
    Gradients come from ``torch.autograd.grad`` w.r.t. the captured activations, so
    parameter ``.grad``s are untouched; hooks, BN buffers and train flags are restored.
    Works for any module with ``named_blocks()`` whose forward runs the blocks in order.
    """
    blocks = model.named_blocks()
    captured: list[torch.Tensor] = []
    handles = [b.register_forward_pre_hook(lambda _m, args: captured.append(args[0])) for _, b in blocks]
    handles.append(blocks[-1][1].register_forward_hook(lambda _m, _a, out: captured.append(out)))
    device = device_of(model)
    try:
        with _probe_mode(model, train=True), torch.enable_grad(), torch.autocast(device.type, enabled=False):
            x = x.to(device).detach().requires_grad_()  # so even a first block with no stem is in the graph
            loss = F.cross_entropy(model(x), y.to(device))
            grads = torch.autograd.grad(loss, captured)
    finally:
        for h in handles:
            h.remove()
    norms = torch.stack(torch._foreach_norm(list(grads))).tolist()  # one host read
    return list(zip([n for n, _ in blocks] + [HEAD_INPUT], norms))


def layer_responses(model: ResNet, batches: Iterable[Batch]) -> list[tuple[str, float]]:
    """Std of each 3x3 conv's output after BN, before ReLU/addition (He et al. Fig. 7).

    Eval mode, no grad, fp32. The std is over every element of every batch (unbiased,
    like ``torch.std``), from float64 sum / sum of squares kept on the device.
    """
    layers = response_layers(model)
    device = device_of(model)
    acc = torch.zeros(len(layers), 2, dtype=torch.float64, device=device)  # sum, sum of squares
    counts = [0] * len(layers)  # element counts are shapes, known on the host

    def make_hook(i: int) -> Callable[..., None]:
        def hook(_m: nn.Module, _a: tuple, out: torch.Tensor) -> None:
            o = out.detach().double()
            acc[i] += torch.stack([o.sum(), (o * o).sum()])
            counts[i] += o.numel()
        return hook

    handles = [bn.register_forward_hook(make_hook(i)) for i, (_, bn) in enumerate(layers)]
    try:
        with _probe_mode(model, train=False), torch.no_grad(), torch.autocast(device.type, enabled=False):
            for x, _y in batches:
                model(x.to(device))
    finally:
        for h in handles:
            h.remove()
    if counts[0] < 2:
        raise UserError("layer_responses needs at least one batch; pass the test set or a fixed subset of it")
    n = torch.tensor(counts, dtype=torch.float64, device=device)
    var = (acc[:, 1] - acc[:, 0] ** 2 / n) / (n - 1)
    return list(zip([name for name, _ in layers], var.clamp_min(0).sqrt().tolist()))  # one host read


def tidy_table(iterations: list[int], values: np.ndarray, layers: list[str],
          layer_index: list[int] | None = None, group: list[str] | None = None) -> pd.DataFrame:
    """Wide [rows, layers] -> one row per (iteration, layer); strings categorical to stay small."""
    codes = np.tile(np.arange(len(layers)), len(iterations))
    columns: dict[str, object] = {
        "iteration": np.repeat(np.asarray(iterations, dtype=np.int64), len(layers)),
        "layer": pd.Categorical.from_codes(codes, categories=layers),
        "layer_index": np.asarray(layer_index or range(len(layers)), dtype=np.int64)[codes],
    }
    if group is not None:
        columns["group"] = pd.Categorical(np.asarray(group, dtype=object)[codes], categories=GROUPS)
    columns["value"] = np.asarray(values, dtype=np.float64).reshape(-1)
    return pd.DataFrame(columns)


def flow_summary(flow: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """||dL/dx|| at the first block's input over ||dL/dx|| at the head's input (``gradient_flow``'s
    first and last value): how much the gradient grows (> 1) or shrinks (< 1) on its way down."""
    head = flow[-1][1]
    return [(f"{SUMMARY_PREFIX}/grad_flow/input_over_head", flow[0][1] / head if head > 0 else math.nan)]


def response_summary(responses: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """Mean response std of each stage's 3x3 convs (``layer_responses``), the per-stage view of He et al. Fig. 7."""
    values = [v for _, v in responses]
    return [(f"{SUMMARY_PREFIX}/response_std/{stage}", float(np.mean([values[i] for i in cols])))
            for stage, cols in _stage_groups([n for n, _ in responses]).items()]


@dataclass
class _PointSeries:
    """One probe-point series' history: a value per layer at each ``measure`` iteration."""

    prefix: str
    layers: list[str] = field(default_factory=list)
    iterations: list[int] = field(default_factory=list)
    values: list[list[float]] = field(default_factory=list)

    def add(self, iteration: int, result: list[tuple[str, float]], summary: list[tuple[str, float]],
            layer_metrics: bool) -> list[tuple[str, float, int]]:
        """Keep ``result`` (every layer); return its MLflow points: ``summary``, and with
        ``layer_metrics`` one point per layer too."""
        self.layers = self.layers or [n for n, _ in result]
        self.iterations.append(iteration)
        self.values.append([v for _, v in result])
        per_layer = [(metric_name(self.prefix, n), v) for n, v in result] if layer_metrics else []
        return [(n, v, iteration) for n, v in per_layer + summary]

    def table(self) -> pd.DataFrame:
        wide = np.asarray(self.values, dtype=np.float64).reshape(len(self.iterations), len(self.layers))
        return tidy_table(self.iterations, wide, self.layers)


class Probes:
    """The training loop's single handle on all probes.

    ``on_backward(it)`` every step (cheap, no sync); ``measure(it)`` at each probe point (init,
    each evaluation and the end); ``drain()`` at each log interval -> (metric, value, step) for MLflow, with
    grad norms only at the latest measured step; ``tables()`` keeps everything.
    """

    def __init__(self, model: ResNet, *, device: torch.device, grad_every: int = 1, log_every: int = 100,
                 probe_batch: Batch | None = None,
                 response_batches: Callable[[], Iterable[Batch]] | None = None,
                 enabled: bool = True, layer_metrics: bool = False) -> None:
        self.model, self.enabled, self.layer_metrics = model, enabled, layer_metrics
        self.response_batches = response_batches
        self.probe_batch = tuple(t.to(device) for t in probe_batch) if probe_batch is not None and enabled else None
        # A device buffer holds one log window's rows: steps 0, g, 2g, ... of a window of L steps are
        # at most ceil(L / g) <= L // g + 1 rows, so a window between two drains fills at most one buffer.
        rows_per_window = max(log_every, 1) // grad_every + 1
        self.grad = (GradNormProbe(model, device=device, grad_every=grad_every, capacity=rows_per_window)
                     if enabled else None)
        self._drained_step: int | None = None
        self._flow, self._resp = _PointSeries("grad_flow"), _PointSeries("response_std")
        self._pending: list[tuple[str, float, int]] = []

    def on_backward(self, iteration: int) -> None:
        """After ``loss.backward()``, before ``optimizer.step()``; queues device work only."""
        if self.grad is not None:
            self.grad.record(iteration)

    def measure(self, iteration: int) -> None:
        """A probe point: gradient flow on the probe batch and layer responses; syncs, so call it rarely."""
        if not self.enabled:
            return
        if self.probe_batch is not None:
            flow = gradient_flow(self.model, *self.probe_batch)
            self._pending += self._flow.add(iteration, flow, flow_summary(flow), self.layer_metrics)
        if self.response_batches is not None:
            resp = layer_responses(self.model, self.response_batches())
            self._pending += self._resp.add(iteration, resp, response_summary(resp), self.layer_metrics)

    def drain(self) -> list[tuple[str, float, int]]:
        """Metrics since the last drain: grad-norm summaries (and, with ``layer_metrics``, every
        layer's norm) at the latest measured step, then every probe point's.

        One device-to-host read for all grad-norm rows since the last drain; the full
        history stays in ``tables()``.
        """
        out, self._pending = self._pending, []
        latest = self.grad.latest() if self.grad is not None else None
        if latest is not None and latest[0] != self._drained_step:
            step, row = latest
            per_layer = zip(self.grad.metric_names(), map(float, row)) if self.layer_metrics else []
            out = [(n, v, step) for n, v in [*per_layer, *self.grad.summary(row)]] + out
            self._drained_step = step
        return out

    def grad_history(self) -> tuple[list[int], np.ndarray]:
        """(iteration of each row, rows [n, columns]) of every grad-norm row measured so far, flushed."""
        g = self.grad
        return (list(g.iterations), g.rows()) if g is not None else ([], np.zeros((0, 0), np.float32))

    def state_dict(self, rows_elsewhere: bool = False) -> dict:
        """Everything measured so far, on the host, so a resumed run writes the same tables.

        Pending eval metrics are part of it: a checkpoint taken between ``measure`` and
        ``drain`` must not lose them. The grad-norm rows (one per step: most of the history) are
        left out with ``rows_elsewhere``: only their count is kept, and the caller stores the rows
        (``grad_history``) where they need not be rewritten at every checkpoint.
        """
        iterations, rows = self.grad_history()
        inline = self.grad is not None and not rows_elsewhere
        return {"grad_rows": torch.from_numpy(rows.copy()) if inline else None,  # a tensor: weights_only
                "grad_iterations": iterations if inline else [],
                "grad_count": len(iterations), "grad_columns": rows.shape[1],
                "drained_step": self._drained_step, "pending": list(self._pending),
                "flow": vars(self._flow).copy(), "resp": vars(self._resp).copy()}

    def load_state_dict(self, state: dict, rows: tuple[list[int], np.ndarray] | None = None) -> None:
        """Put back a ``state_dict``; ``rows`` = (iterations, rows) kept elsewhere when it left them out."""
        g = self.grad
        if g is not None and (state["grad_rows"] is not None or rows is not None):
            iterations, values = rows if rows is not None else (state["grad_iterations"], state["grad_rows"].numpy())
            g._full, g._pending_iters = [], []
            g._host, g.iterations = [np.asarray(values, dtype=np.float32)], list(iterations)
        self._drained_step, self._pending = state["drained_step"], list(state["pending"])
        self._flow, self._resp = _PointSeries(**state["flow"]), _PointSeries(**state["resp"])

    def tables(self) -> dict[str, pd.DataFrame]:
        """Tidy tables of everything so far: iteration, layer, layer_index, [group], value.

        Totals are left out of ``grad_norms`` (they would double count in a groupby); each is
        sqrt(sum(value**2)) per (iteration, group).
        """
        g = self.grad
        if g is not None:
            rows, nw = g.rows(), len(g.weight_names)
            values = np.concatenate([rows[:, :nw], rows[:, nw + 1:-1]], axis=1)
            frames = {"grad_norms": tidy_table(g.iterations, values, g.weight_names + g.bn_names,
                                          layer_index=[*range(nw), *range(len(g.bn_names))],
                                          group=["weight"] * nw + ["bn"] * len(g.bn_names))}
        else:
            frames = {"grad_norms": tidy_table([], np.zeros((0, 0)), [], group=[])}
        return frames | {"grad_flow": self._flow.table(), "responses": self._resp.table()}

    def write_tables(self, directory: Path) -> list[Path]:
        """Write ``grad_norms.parquet``, ``grad_flow.parquet``, ``responses.parquet`` into ``directory``."""
        if not self.enabled:
            return []
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = []
        for key, df in self.tables().items():
            paths.append(directory / f"{key}.parquet")
            df.to_parquet(paths[-1], index=False)
        return paths

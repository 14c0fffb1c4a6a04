"""Lesion study (Veit et al. 2016): test error with blocks deleted, BN in eval mode.

Deleting a residual block keeps its shortcut and drops the branch: the block becomes
ReLU(shortcut(x)), exactly what it computes when the branch outputs zero. A plain block is
replaced by the identity where its input and output shapes match; a plain block that
changes shape (a stage entry) cannot be deleted and gets a ``not_applicable`` row.

Work is batched: per batch of test images the undeleted forward is run once and each
block's input kept, so every deletion pattern restarts from the input of its first deleted
block; error counts stay on the device and are read back once.

Table columns (kind, k, block, draw, error), error in %:
``baseline`` (k=0), ``single`` (k=1, one row per deletable block), ``not_applicable`` (k=1,
error NaN), ``k_blocks`` (k deletable blocks drawn at random, ``block`` their names joined
by ``+``, draws 0..R-1). k runs 1..floor(B/2) for B deletable blocks.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ..data import LESION_DRAW_STREAM, derive_seed
from ..device import sum_dtype
from ..models import BasicBlock, ResNet
from .common import check_inputs, untouched
from .settings import LesionSettings

Pattern = tuple[int, ...]  # indices of deleted blocks, ascending


def deletable(block: BasicBlock) -> bool:
    """Residual blocks always (the shortcut remains); plain ones only where shape is kept."""
    same_shape = block.conv1.stride == (1, 1) and block.conv1.in_channels == block.conv2.out_channels
    return block.shortcut is not None or same_shape


def deleted_output(block: BasicBlock, x: torch.Tensor) -> torch.Tensor:
    """What a deleted block passes on: ReLU(shortcut(x)) if residual, else x itself."""
    return F.relu(block.shortcut(x)) if block.shortcut is not None else x


def lesioned_forward(model: ResNet, x: torch.Tensor, deleted: Pattern, start: int = 0) -> torch.Tensor:
    """Logits with the ``deleted`` blocks removed; ``x`` is the input of block ``start``
    (the stem output when ``start`` is 0 and ``x`` came through ``model.stem``)."""
    blocks = model.blocks()
    for i in range(start, len(blocks)):
        x = deleted_output(blocks[i], x) if i in deleted else blocks[i](x)
    return model.forward_head(x)


def patterns(model: ResNet, settings: LesionSettings) -> tuple[list[Pattern], list[tuple[str, int, int]]]:
    """Every deletion pattern with its (kind, k, draw): baseline, singles, then k-block draws."""
    ok = [i for i, b in enumerate(model.blocks()) if deletable(b)]
    pats: list[Pattern] = [()] + [(i,) for i in ok]
    labels = [("baseline", 0, 0)] + [("single", 1, 0)] * len(ok)
    for k in range(1, len(ok) // 2 + 1):
        for r in range(settings.draws):
            g = torch.Generator().manual_seed(derive_seed(settings.seed, LESION_DRAW_STREAM, k, r))
            pick = torch.randperm(len(ok), generator=g)[:k].tolist()
            pats.append(tuple(sorted(ok[j] for j in pick)))
            labels.append(("k_blocks", k, r))
    return pats, labels


@torch.no_grad()
def _error_counts(model: ResNet, x: torch.Tensor, y: torch.Tensor, pats: list[Pattern], batch_size: int) -> torch.Tensor:
    """Misclassified counts per pattern, on the device; each pattern restarts at its first deletion."""
    counts = torch.zeros(len(pats), dtype=torch.int64, device=x.device)
    blocks = model.blocks()
    for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
        inputs = [model.stem(xb)]
        for b in blocks:
            inputs.append(b(inputs[-1]))
        for j, pat in enumerate(pats):
            start = pat[0] if pat else len(blocks)
            counts[j] += (lesioned_forward(model, inputs[start], pat, start).argmax(1) != yb).sum()
    return counts


def lesion(model: ResNet, x: torch.Tensor, y: torch.Tensor, settings: LesionSettings) -> tuple[pd.DataFrame, dict[str, float]]:
    """Single- and k-block deletion errors on (x, y), normalised test images on the model's device."""
    check_inputs(x, y, "lesion")
    names = [n for n, _ in model.named_blocks()]
    pats, labels = patterns(model, settings)
    with untouched(model):
        errors = (_error_counts(model, x, y, pats, settings.batch_size).to(sum_dtype(x.device)) * (100.0 / len(y))).tolist()
    rows = [(kind, k, "+".join(names[i] for i in pat), draw, err) for pat, (kind, k, draw), err in zip(pats, labels, errors)]
    rows += [("not_applicable", 1, n, 0, np.nan) for n, b in model.named_blocks() if not deletable(b)]
    df = pd.DataFrame(rows, columns=["kind", "k", "block", "draw", "error"]).astype({"k": "int64", "draw": "int64", "error": "float64"})
    base = errors[0]
    single = np.asarray([e for e, (kind, _, _) in zip(errors, labels) if kind == "single"]) - base
    metrics = {"diag/lesion/baseline_error": base,
               "diag/lesion/single_mean_increase": float(single.mean()) if single.size else float("nan"),
               "diag/lesion/single_max_increase": float(single.max()) if single.size else float("nan")}
    return df, metrics

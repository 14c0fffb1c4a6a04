"""A finished run's net as an MLflow model, and the data it trained on as the run's dataset input.

The model goes to the run's ``model/`` artifact folder, beside ``model/state_dict.pt`` and
``model/init_state_dict.pt`` (which the diagnostics read), so one call loads it::

    net = mlflow.pytorch.load_model(f"runs:/{run_id}/model")

It is MLflow's pickle form of ``resnet_lab.models.ResNet`` (loading needs this package
installed; torch.export's ``pt2`` form would not, but it fixes the batch size unless every
dimension is declared, and a plain module is what a notebook wants), on the CPU in fp32, in eval
mode. Its signature says the input (float32 [N, C, H, W]) and output (float32 logits [N, classes]);
its metadata the normalisation it expects: pixels / 255, then (x - mean) / std per channel, with
the mean and std of the run's training split. Without MLflow's loader, ``net_of_run`` builds the
net from the run's params and loads ``model/state_dict.pt``.

The dataset input (``mlflow.log_input``'s record, shown in the runs table's Dataset column) names
the dataset and carries a digest of the exact images and labels of every split the run used, so
plain-n and resnet-n of one seed show the same digest when they saw the same data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import TrainConfig
from .data import Dataset
from .models import ResNet, build_model

MODEL_DIR = "model"  # the artifact folder: the MLflow model and the two state dicts


def portable_copy(model: nn.Module, cfg: TrainConfig, data: Dataset) -> ResNet:
    """A fresh net with ``model``'s weights, on the CPU in fp32, contiguous, in eval mode: no probe
    hooks, no compiled twin, no device in what is pickled."""
    net = build_model(cfg.model, in_channels=data.in_channels, num_classes=data.num_classes,
                      shortcut=cfg.shortcut, zero_init_residual=cfg.zero_init_residual)
    net.load_state_dict({k: v.detach().float().cpu().contiguous() if v.is_floating_point() else v.detach().cpu()
                         for k, v in model.state_dict().items()})
    return net.eval()


def model_metadata(cfg: TrainConfig, data: Dataset) -> dict[str, Any]:
    """What a user of the net needs to feed it: the normalisation, the input size, the classes."""
    return {"mean": list(data.mean), "std": list(data.std), "dataset": cfg.dataset, "num_classes": data.num_classes,
            "input": f"float32 [N, {data.in_channels}, {data.image_size}, {data.image_size}]: pixels / 255, "
                     "then (x - mean) / std per channel" + (f", after resizing to {cfg.resize}" if cfg.resize else "")}


def save_model(model: nn.Module, cfg: TrainConfig, data: Dataset, directory: Path) -> Path:
    """Write the MLflow model folder of ``model`` under ``directory``; returns it."""
    import mlflow.pytorch
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    size = data.image_size
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, data.in_channels, size, size))]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, data.num_classes))]))
    out = directory / MODEL_DIR
    pytorch_log = logging.getLogger("mlflow.pytorch")
    level = pytorch_log.level
    pytorch_log.setLevel(logging.ERROR)  # its per-save advice to use pt2 (see the module docstring)
    try:
        # pip requirements given, not inferred: inferring them imports the model in a subprocess (seconds)
        mlflow.pytorch.save_model(portable_copy(model, cfg, data), str(out), signature=signature,
                                  serialization_format="pickle", metadata=model_metadata(cfg, data),
                                  pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "resnet_lab"])
    finally:
        pytorch_log.setLevel(level)
    return out


def log_model(tracker: Any, model: nn.Module, cfg: TrainConfig, data: Dataset) -> None:
    """The run's final net as the MLflow model ``runs:/<run id>/model``."""
    with tempfile.TemporaryDirectory() as tmp:
        tracker.log_artifact_dir(save_model(model, cfg, data, Path(tmp)), MODEL_DIR)


def data_digest(data: Dataset) -> str:
    """blake2b of every split's images and labels, in order: equal digests, the same examples."""
    h = hashlib.blake2b(digest_size=8)
    for name, split in (("train", data.train), ("val", data.val), ("test", data.test)):
        h.update(name.encode())
        if split is not None:
            for t in (split.images, split.labels):
                h.update(t.contiguous().numpy().data)  # a view of the tensor's memory, no copy
    return h.hexdigest()


def dataset_input(cfg: TrainConfig, data: Dataset) -> Any:
    """MLflow's record of the data a run trained on (name, source, split sizes, digest), context training."""
    from mlflow.entities import Dataset as MlflowDataset
    from mlflow.entities import DatasetInput, InputTag

    sizes = {name: len(split) for name, split in (("train", data.train), ("val", data.val), ("test", data.test))
             if split is not None}
    subset = {"val_size": cfg.val_size, "train_size": cfg.train_size, "test_size": cfg.test_size,
              "split_seed": cfg.seed, "resize": cfg.resize}
    entity = MlflowDataset(name=cfg.dataset, digest=data_digest(data),
                           source_type="code" if data.source == "synthetic" else "local",
                           source=json.dumps({"uri": data.source}),
                           schema=json.dumps({"images": f"uint8 [N, {data.in_channels}, {data.image_size}, "
                                                        f"{data.image_size}]", "labels": "int64 [N]",
                                              "classes": data.num_classes}),
                           profile=json.dumps({"num_rows": sizes, **subset}))
    return DatasetInput(entity, tags=[InputTag("mlflow.data.context", "training")])


def net_of_run(run_id: str, tracking_uri: str | None = None) -> ResNet:
    """The state-dict form: the net built from the run's params with ``model/state_dict.pt`` loaded
    (what ``mlflow.pytorch.load_model`` gives, without MLflow's pickle)."""
    from mlflow import MlflowClient

    from .data import NUM_CLASSES
    from .tracking import resolve_tracking_uri

    client = MlflowClient(resolve_tracking_uri(tracking_uri))
    p = client.get_run(run_id).data.params
    channels = 1 if p["dataset"] in ("fashion-mnist", "synthetic") else 3
    net = build_model(p["model"], in_channels=channels, num_classes=NUM_CLASSES[p["dataset"]],
                      shortcut=None if p["shortcut"] == "none" else p["shortcut"])
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run_id, f"{MODEL_DIR}/state_dict.pt", tmp)
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return net.eval()


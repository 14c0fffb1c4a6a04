"""Trained nets one call away: each finished run's MLflow model and dataset input (resnet_lab.runmodel)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from resnet_lab.config import TrainConfig
from resnet_lab.data import load_dataset
from resnet_lab.runmodel import net_of_run
from resnet_lab.train import train

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "runmodel"


def _cfg(tracking_uri: str, model: str, seed: int = 0) -> TrainConfig:
    return TrainConfig(model=model, dataset="synthetic", iterations=30, log_every=10, eval_every=30, batch_size=32,
                       eval_batch_size=512, tracking_uri=tracking_uri, experiment=EXPERIMENT, progress=False,
                       device="cpu", checkpoint_every=0, seed=seed, precision="fp32", compile=False, probes=False)


@pytest.fixture(scope="module")
def runs(tracking_uri: str) -> dict[str, str]:
    """plain-8 and resnet-8 of seed 0 and resnet-8 of seed 1, finished; name -> run id."""
    tags = {"kind": "train", "scale": "full", "study": EXPERIMENT}
    out = {}
    for model, seed in (("plain-8", 0), ("resnet-8", 0), ("resnet-8", 1)):
        result = train(_cfg(tracking_uri, model, seed), extra_tags=tags)
        assert result.status == "FINISHED"
        out[f"{model}-s{seed}"] = result.run_id
    return out


def test_the_readme_lines_load_and_evaluate_the_seed_0_net(runs: dict[str, str], tracking_uri: str) -> None:
    """The README's lines, with the study, net and dataset swapped for the tiny run's: they print
    the test error the run itself logged (fp32 both; at most one image apart, from layout rounding)."""
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"## Trained nets, one call away.*?```python\n(.*?)```", readme, re.S).group(1)
    code = (code.replace('"cifar10_paper"', f'"{EXPERIMENT}"').replace("'resnet-56'", "'resnet-8'")
            .replace('load_dataset("cifar10")', 'load_dataset("synthetic")'))
    mlflow.set_tracking_uri(tracking_uri)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    printed = float(out.getvalue().split("test error %:")[1])
    logged = MlflowClient(tracking_uri).get_run(runs["resnet-8-s0"]).data.metrics["final/test_error"]
    assert abs(printed - logged) <= 100 / 512 + 1e-9


def test_the_model_has_its_signature_normalisation_and_the_state_dict_form(runs: dict[str, str],
                                                                           tracking_uri: str) -> None:
    run_id = runs["resnet-8-s0"]
    mlflow.set_tracking_uri(tracking_uri)
    info = mlflow.models.get_model_info(f"runs:/{run_id}/model")
    data = load_dataset("synthetic", seed=0)
    assert info.signature.inputs.inputs[0].shape == (-1, 1, 28, 28)
    assert str(info.signature.inputs.inputs[0].type) == "float32"
    assert info.signature.outputs.inputs[0].shape == (-1, 10)
    assert info.metadata["mean"] == pytest.approx(list(data.mean)) and info.metadata["std"] == pytest.approx(list(data.std))
    net = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    twin = net_of_run(run_id, tracking_uri)
    x = torch.randn(4, 1, 28, 28)
    assert not net.training and torch.equal(net(x), twin(x))  # the two forms are one net
    files = {a.path for a in MlflowClient(tracking_uri).list_artifacts(run_id, "model")}
    assert {"model/MLmodel", "model/state_dict.pt", "model/init_state_dict.pt"} <= files  # the diagnostics' files stay


def test_plain_and_resnet_of_a_seed_show_the_same_dataset_digest(runs: dict[str, str], tracking_uri: str) -> None:
    client = MlflowClient(tracking_uri)

    def dataset(name: str) -> tuple[str, str]:
        (inp,) = client.get_run(runs[name]).inputs.dataset_inputs
        assert [(t.key, t.value) for t in inp.tags] == [("mlflow.data.context", "training")]
        return inp.dataset.name, inp.dataset.digest

    assert dataset("plain-8-s0") == dataset("resnet-8-s0")
    assert dataset("resnet-8-s1")[0] == "synthetic" and dataset("resnet-8-s1") != dataset("resnet-8-s0")  # other data


def test_the_digest_follows_the_data(tracking_uri: str) -> None:
    from resnet_lab.runmodel import data_digest

    a, b = load_dataset("synthetic", seed=0), load_dataset("synthetic", seed=0)
    assert data_digest(a) == data_digest(b)
    b.test.labels[0] += 1
    assert data_digest(a) != data_digest(b)
    c = dataclasses.replace(a, val=None)
    assert data_digest(load_dataset("synthetic", seed=0, val_size=100)) != data_digest(c)

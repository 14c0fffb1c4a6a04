"""The tracking-URI rules asked everywhere (resnet_lab.tracking), and values logged for reading."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from resnet_lab.errors import UserError
from resnet_lab.tracking import RunTracker, is_server, local_store, readable, require_store


def test_each_kind_of_uri_names_its_store() -> None:
    assert local_store("sqlite:///rel/mlflow.db") == Path("rel/mlflow.db")
    assert local_store("sqlite:////abs/mlflow.db?timeout=5") == Path("/abs/mlflow.db")
    assert local_store("sqlite://") is None  # in memory
    assert local_store("file:///abs/mlruns") == Path("/abs/mlruns")
    assert local_store("file:mlruns") == Path("mlruns") == local_store("mlruns")
    for server in ("http://127.0.0.1:5000", "https://user:pw@mlflow.example.org"):
        assert is_server(server) and local_store(server) is None
    assert not any(map(is_server, ("sqlite:///mlflow.db", "file:///abs/mlruns", "mlruns")))


def test_a_missing_store_is_one_line_and_nothing_is_created(tmp_path: Path) -> None:
    for uri, path in ((f"sqlite:///{tmp_path}/none/mlflow.db", tmp_path / "none"),
                      (f"file://{tmp_path}/mlruns", tmp_path / "mlruns")):
        with pytest.raises(UserError, match="no MLflow tracking store") as e:
            require_store(uri)
        assert "\n" not in str(e.value) and not path.exists()
    (tmp_path / "mlflow.db").touch()
    (tmp_path / "mlruns").mkdir()
    require_store(f"sqlite:///{tmp_path}/mlflow.db")
    require_store(f"file://{tmp_path}/mlruns")
    require_store("http://127.0.0.1:1")  # a server is asked when connecting, not here


def test_values_are_logged_without_float_noise(tmp_path: Path) -> None:
    """Params and metrics keep 12 significant digits: the noise of arithmetic goes, every digit a
    result carries stays."""
    assert readable(0.0005000000000000001) == 0.0005 and readable(68.60000000000001) == 68.6
    assert abs(readable(1 / 3) - 1 / 3) < 1e-12 and readable(1e-20 / 3) == pytest.approx(1e-20 / 3, rel=1e-11)
    assert math.isnan(readable(float("nan"))) and readable(float("inf")) == float("inf")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = RunTracker.create(uri, "rounding", "r", params={"lr": 0.1 * 0.005, "depth": 20, "model": "resnet-20"},
                                tags={})
    tracker.log([("test/error", 100 * 343 / 500, 1), ("final/test_error", 100 * 343 / 500, 0)])
    tracker.finish()
    run = tracker.client.get_run(tracker.run_id)
    assert run.data.params == {"lr": "0.0005", "depth": "20", "model": "resnet-20"}
    assert run.data.metrics == {"test/error": 68.6, "final/test_error": 68.6}

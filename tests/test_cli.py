"""Bad input: one line on stderr, exit 2, and no MLflow store or run left behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torchvision

import resnet_lab.data as data_mod
from resnet_lab_command import main

TRAIN = ["train", "--dataset", "synthetic", "--model", "resnet-8", "--iterations", "10", "--no-progress"]


def _bad_toml(tmp: Path) -> str:
    f = tmp / "bad.toml"
    f.write_text("model = \n")
    return str(f)


def _unknown_key_toml(tmp: Path) -> str:
    f = tmp / "unknown.toml"
    f.write_text("learning_rate = 0.1\n")
    return str(f)


BAD_INPUTS = {
    "unknown model": (["--model", "vgg-16"], "unknown model"),
    "depth not 6n+2": (["--model", "resnet-21"], "6n+2"),
    "plain depth not 18/34": (["--model", "plain-19"], "18/34"),
    "unknown dataset": (["--dataset", "mnist"], "unknown dataset"),
    "lr zero": (["--set", "lr=0"], "lr must be a positive"),
    "lr negative": (["--set", "lr=-0.1"], "lr must be a positive"),
    "batch not positive": (["--set", "batch_size=0"], "batch_size must be a positive"),
    "iterations not positive": (["--iterations", "0"], "iterations must be a positive"),
    "milestones not increasing": (["--set", "milestones=8,4"], "strictly increasing"),
    "milestone beyond the run": (["--set", "milestones=5,10"], "not before the last iteration"),
    "unknown --set key": (["--set", "learning_rate=0.1"], "unknown config key"),
    "--set without =": (["--set", "lr"], "key=value"),
    "--set wrong type": (["--set", "batch_size=big"], "batch_size expects"),
    "unreadable config": (["--config", "/nonexistent/study.toml"], "cannot read config file"),
    "invalid TOML": (lambda tmp: ["--config", _bad_toml(tmp)], "not valid TOML"),
    "unknown key in TOML": (lambda tmp: ["--config", _unknown_key_toml(tmp)], "unknown config key"),
    "zero-init plain net": (["--model", "plain-8", "--set", "zero_init_residual=true"], "residual"),
    "batch larger than data": (["--set", "batch_size=4096"], "larger than"),
    "iterations and epochs": (["--epochs", "1"], "not both"),
    "unknown device": (["--device", "tpu"], "device must be"),
    "unknown flag": (["--lr", "0.1"], "unrecognized arguments"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    extra, expected = BAD_INPUTS[case]
    if callable(extra):
        extra = extra(tmp_path)
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "store" / "mlflow.db"
    db.parent.mkdir()
    code = main(TRAIN + ["--tracking-uri", f"sqlite:///{db}"] + extra)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("resnet-lab: error: ") and err.count("\n") == 1, err
    assert expected in err
    assert not db.exists(), "bad input must not create an MLflow store or run"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["store"] + [p.name for p in tmp_path.glob("*.toml")])


def test_fashion_mnist_missing_offline_names_the_ways_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """No explicit dir, no cache, no Debian package, and the download fails (offline)."""
    monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
    monkeypatch.setattr(data_mod, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian")

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "download", offline)
    db = tmp_path / "mlflow.db"
    code = main(["train", "--dataset", "fashion-mnist", "--model", "resnet-8", "--iterations", "10",
                 "--tracking-uri", f"sqlite:///{db}", "--set", f"data_root={tmp_path / 'data'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "apt-get install dataset-fashion-mnist" in err and "--data-dir" in err and "FASHION_MNIST_DIR" in err
    assert not db.exists()


def test_explicit_data_dir_without_the_files_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path), "--iterations", "10",
                 "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    err = capsys.readouterr().err
    assert code == 2 and str(tmp_path) in err and err.count("\n") == 1
    assert not (tmp_path / "mlflow.db").exists()


def test_console_script_help_for_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    """The installed console script runs (help, and a one-line error with exit 2); every
    subcommand's help is checked in-process (each subprocess costs an import of torch and MLflow)."""
    exe = Path(sys.executable).parent / "resnet-lab"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "usage: resnet-lab" in out.stdout
    out = subprocess.run([str(exe), "describe", "resnet-21"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    for sub in ("train", "describe", "study", "diagnose", "report", "ui"):
        with pytest.raises(SystemExit) as exit_:
            main([sub, "--help"])
        assert exit_.value.code == 0 and f"usage: resnet-lab {sub}" in capsys.readouterr().out


def test_building_the_command_line_imports_no_torch() -> None:
    """``resnet-lab ui`` and ``--help`` start without importing torch (6 s of a 2-core machine's
    start-up): only a command that trains, describes or diagnoses imports it."""
    code = ("import sys; from resnet_lab_command import make_parser; make_parser().parse_args(['ui']); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_report_imports_no_torch() -> None:
    """``resnet-lab report`` reads MLflow and draws; torch would add ~3 s to every report."""
    code = ("import sys; import analysis.document, analysis.report, analysis.runs; "
            "from analysis.report import parent_note; from resnet_lab.tracking import describe_study; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.parametrize("args, expected", [
    (["describe", "resnet-20", "--resize", "-8"], "resize must be a positive integer, got -8"),
    (["describe", "resnet-20", "--resize", "0"], "resize must be a positive integer, got 0"),  # once silently ignored
    (["describe", "resnet-20", "--dataset", "mnist"], "unknown dataset"),
    (["ui", "--port", "99999"], "'99999' is not a port"),  # once an OverflowError traceback
    (["ui", "--port", "-1"], "'-1' is not a port"),
    (["ui", "--port", "http"], "'http' is not a port"),
])
def test_describe_and_ui_refuse_bad_sizes_and_ports_in_one_line(args: list[str], expected: str,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """``describe`` checks its size and dataset as ``train`` does; a port outside 1-65535 is refused
    before anything starts."""
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err


def test_describe_defaults_to_the_dataset_train_uses(capsys: pytest.CaptureFixture[str]) -> None:
    from resnet_lab.config import TrainConfig

    assert main(["describe", "resnet-8"]) == 0
    assert f"on {TrainConfig().dataset} " in capsys.readouterr().out.splitlines()[0]


def test_help_config_says_what_every_field_means(capsys: pytest.CaptureFixture[str]) -> None:
    """One line per config field, each with a description; switches show their choices as the README
    writes them (compile auto|true|false)."""
    from dataclasses import fields

    from resnet_lab.config import TrainConfig

    assert main(["train", "--help-config"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [f.name for f in fields(TrainConfig)]
    assert [ln.split()[0] for ln in lines] == names
    by_name = {ln.split()[0]: ln for ln in lines}
    assert all(len(ln.split("default", 1)[1].split()) >= 3 for ln in lines)  # a value, then words saying what it is
    assert by_name["compile"].split()[1:4] == ["auto|true|false", "default", "auto"]
    assert "gradient-norm" in by_name["grad_every"] and "validation" in by_name["val_size"]


def test_every_train_flag_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--seed SEED initial weights, data order and augmentation" in out

"""The config is typed and validated before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from resnet_lab.config import TrainConfig, apply, load_toml, parse_overrides
from resnet_lab.errors import UserError
from resnet_lab.train import lr_at


def test_paper_schedule_with_warmup() -> None:
    """He et al. 4.2: lr 0.1, /10 at 32k and 48k; ResNet-110 warms up at 0.01 for ~400 iterations."""
    cfg = TrainConfig(warmup_iterations=400).resolved(64000)
    assert cfg.milestones == [32000, 48000]
    assert [lr_at(cfg, i) for i in (0, 399, 400, 31999)] == [0.01, 0.01, 0.1, 0.1]
    assert lr_at(cfg, 32000) == pytest.approx(0.01)
    assert lr_at(cfg, 48000) == pytest.approx(0.001)
    assert lr_at(cfg, 63999) == pytest.approx(0.001)


def test_default_milestones_scale_with_the_run_length() -> None:
    assert TrainConfig(iterations=1000).resolved(1000).milestones == [500, 750]
    assert TrainConfig(milestones=[10, 20]).resolved(1000).milestones == [10, 20]


def test_toml_and_overrides_are_typed(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('model = "plain-56"\nlr = 0.05\nmilestones = [100, 200]\naugment = false\n')
    cfg = apply(TrainConfig(), load_toml(f), str(f))
    cfg = apply(cfg, parse_overrides(["batch_size=64", "shortcut=B", "resize=none", "iterations=3e2"]), "--set")
    assert (cfg.model, cfg.lr, cfg.milestones, cfg.augment) == ("plain-56", 0.05, [100, 200], False)
    assert (cfg.batch_size, cfg.shortcut, cfg.resize, cfg.iterations) == (64, "B", None, 300)
    cfg.validate()


def test_a_train_table_in_toml_is_accepted(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('[train]\nmodel = "resnet-32"\n')
    assert apply(TrainConfig(), load_toml(f), str(f)).model == "resnet-32"


@pytest.mark.parametrize("values,match", [
    ({"lr": "abc"}, "lr expects"),
    ({"batch_size": "1.5"}, "batch_size expects"),
    ({"augment": "maybe"}, "augment expects"),
    ({"milestones": "a,b"}, "milestones expects"),
    ({"learning_rate": "0.1"}, "unknown config key 'learning_rate'"),
])
def test_bad_values_name_the_key(values: dict[str, str], match: str) -> None:
    with pytest.raises(UserError, match=match):
        apply(TrainConfig(), values, "--set")


@pytest.mark.parametrize("changes,match", [
    ({"lr": 0.0}, "lr must be a positive"),
    ({"lr": float("nan")}, "lr must be a positive"),
    ({"batch_size": 0}, "batch_size must be a positive"),
    ({"iterations": -5}, "iterations must be a positive"),
    ({"iterations": None}, "exactly one of iterations and epochs"),
    ({"epochs": 3}, "exactly one of iterations and epochs"),
    ({"milestones": [300, 200]}, "strictly increasing"),
    ({"milestones": [100, 64000]}, "not before the last iteration"),
    ({"warmup_iterations": 64000}, "warmup_iterations"),
    ({"model": "resnet-21"}, r"6n\+2"),
    ({"dataset": "mnist"}, "unknown dataset"),
    ({"shortcut": "D"}, "shortcut must be"),
    ({"momentum": -0.1}, "momentum must be"),
    ({"device": "tpu"}, "device must be"),
])
def test_validation_rejects_impossible_settings(changes: dict, match: str) -> None:
    with pytest.raises(UserError, match=match):
        TrainConfig(**changes).validate()


def test_unreadable_and_invalid_config_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cannot read config file"):
        load_toml(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("lr = = 1")
    with pytest.raises(UserError, match="not valid TOML"):
        load_toml(bad)


def test_compile_is_a_speed_switch_not_a_new_training() -> None:
    """A run compiled and one not compiled train the same net: a study must not retrain on the flag."""
    assert TrainConfig(compile=True).config_hash() == TrainConfig(compile=False).config_hash()
    assert TrainConfig(lr=0.05).config_hash() != TrainConfig().config_hash()


def test_compile_on_cpu_without_a_compiler_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    with pytest.raises(UserError, match="needs a C\\+\\+ compiler"):
        TrainConfig(compile=True, device="cpu").validate()


def test_giving_epochs_unsets_iterations_and_giving_both_is_an_error() -> None:
    """iterations and epochs are two forms of the run length: the last one given wins, both at once is refused."""
    cfg = apply(TrainConfig(), {"epochs": "3"}, "--set")
    assert (cfg.iterations, cfg.epochs) == (None, 3) and cfg.validate()
    cfg = apply(cfg, {"iterations": 500}, "the command line")
    assert (cfg.iterations, cfg.epochs) == (500, None)
    with pytest.raises(UserError, match="not both"):
        apply(TrainConfig(), {"iterations": 10, "epochs": 2}, "--set")
    assert apply(TrainConfig(), {"iterations": "none", "epochs": 2}, "--set").epochs == 2


def test_model_names_are_canonical() -> None:
    """--model RESNET-20 trains resnet-20: the config, its run name and its identity all say resnet-20."""
    cfg = apply(TrainConfig(), {"model": " RESNET-20"}, "--set").validate()
    assert cfg.model == "resnet-20" and cfg.name == "resnet-20-s0"
    assert cfg.config_hash() == TrainConfig(model="resnet-20").config_hash()


@pytest.mark.parametrize("name", ["", "   ", " x", "a/b", "x" * 101])
def test_an_experiment_name_follows_the_study_name_rule_one_line_exit_2_nothing_written(
        name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--experiment ""`` was a 38-line MlflowException and an mlflow.db; "   " made an experiment named three
    spaces. Experiment and study names now share one rule (a study's name is its experiment)."""
    from resnet_lab.cli import main
    from resnet_lab.studyfile import load_scales

    db = tmp_path / "m.db"
    code = main(["train", "--model", "resnet-8", "--dataset", "synthetic", "--iterations", "10", "--no-progress",
                 "--experiment", name, "--tracking-uri", f"sqlite:///{db}", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and not db.exists()
    assert f"experiment must be a short name of letters, digits, '_', '.' or '-' (it is the MLflow experiment), " \
           f"got {' '.join(repr(name).split())}" in err
    study = tmp_path / "s.toml"
    study.write_text(f'name = {name!r}\ndepths = [8]\n[train]\ndataset = "synthetic"\n')
    with pytest.raises(UserError, match="name must be a short name of letters, digits, '_', '.' or '-'"):
        load_scales(study)
    assert TrainConfig(experiment="resnet_lab-1.b").validate().experiment == "resnet_lab-1.b"


@pytest.mark.parametrize("args", [["--iterations", "1e20"], ["--set", "iterations=1e20"], ["--iterations", "1e9"],
                                  ["--set", "iterations=10000001"], ["--config", "{toml}"]])
def test_one_bound_on_the_run_length_however_the_number_is_given(
        args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--set iterations=1e20`` started a run that could never finish while ``--iterations 1e9`` was an
    argparse error: now both are read alike and refused by one bound, with one message."""
    from resnet_lab.cli import main
    from resnet_lab.config import MAX_ITERATIONS

    toml = tmp_path / "c.toml"
    toml.write_text("iterations = 100000000000\n")
    db = tmp_path / "m.db"
    code = main(["train", "--model", "resnet-8", "--dataset", "synthetic", "--no-progress", "--device", "cpu",
                 "--tracking-uri", f"sqlite:///{db}", *[a.format(toml=toml) for a in args]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and not db.exists()
    assert f"iterations must be at most {MAX_ITERATIONS:,} (the paper's runs are 64,000), got " in err
    assert "a run that long would never finish" in err


def test_the_run_length_bound_admits_what_it_should_and_covers_epochs() -> None:
    from resnet_lab.cli import build_config, make_parser
    from resnet_lab.config import MAX_ITERATIONS

    def cfg(*args: str) -> TrainConfig:
        return build_config(make_parser().parse_args(["train", *args]))

    assert cfg("--iterations", "1e5").iterations == 100_000  # the exponent form, as --set reads it
    assert cfg("--set", f"iterations={MAX_ITERATIONS}").iterations == MAX_ITERATIONS
    with pytest.raises(UserError, match="iterations expects"):
        cfg("--iterations", "1.5")
    with pytest.raises(UserError, match=f"epochs must be at most {MAX_ITERATIONS:,}"):
        cfg("--epochs", "1e8")
    with pytest.raises(UserError, match=r"100000 epochs must be at most 10,000,000 iterations .* got 11,700,000 "):
        TrainConfig(iterations=None, epochs=100_000).validate().resolved(117 * 100_000)

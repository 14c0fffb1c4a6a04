"""Precision, layout and compile (resnet_lab.speed): the rules decide what the issue says, the
head's logits are fp32 under bf16, compiling survives a study of many nets and its own failure,
and bf16 trains like fp32 where bf16 is native."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from resnet_lab import speed
from resnet_lab.config import TrainConfig, apply
from resnet_lab.errors import UserError
from resnet_lab.models import build_model
from resnet_lab.speed import (COMPILE_AFTER_ITERATIONS_CPU, COMPILE_AFTER_ITERATIONS_CUDA, CPU_BF16_ENV, CompiledStep,
                               Speed, choose_compile, cpu_bf16_units, native_bf16, plan, sgd_options)
from resnet_lab.data import DeviceLoader, Split
from resnet_lab.runlog import run_tags
from resnet_lab.train import evaluate, prepare, start, train, train_step

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def _fake_cpu(monkeypatch: pytest.MonkeyPatch, *, amx: bool, avx512_bf16: bool) -> None:
    """The CPU's own answer, with the suite's pin (conftest) taken away so that it is asked."""
    monkeypatch.delenv(CPU_BF16_ENV, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)


@pytest.mark.parametrize(("amx", "avx512_bf16", "native"), [(True, False, True), (False, True, True),
                                                            (False, False, False)])
def test_native_bf16_is_amx_or_avx512_bf16_as_torch_reports(monkeypatch: pytest.MonkeyPatch, amx: bool,
                                                             avx512_bf16: bool, native: bool) -> None:
    _fake_cpu(monkeypatch, amx=amx, avx512_bf16=avx512_bf16)
    assert native_bf16(CPU) is native
    s = plan(CPU, "auto", False, 100)
    assert s.precision == ("bf16" if native else "fp32")
    # NHWC: 2.2-2.4x with bf16 on an AMX Xeon (issue 12), 1.3-1.4x in fp32 on an AVX2 EPYC (benchmarks.md)
    assert s.memory_format == torch.channels_last


@pytest.mark.parametrize("units", [False, True])
def test_the_pinned_answer_wins_over_the_cpus_own(monkeypatch: pytest.MonkeyPatch, units: bool) -> None:
    """RESNET_LAB_CPU_BF16 answers for any CPU (how the suite stays host-independent); only "0"/"1" count."""
    _fake_cpu(monkeypatch, amx=units, avx512_bf16=False)
    for pinned, native in (("1", True), ("0", False), ("", units), ("yes", units)):
        monkeypatch.setenv(CPU_BF16_ENV, pinned)
        assert native_bf16(CPU) is native and cpu_bf16_units() is units
        assert plan(CPU, "auto", False, 100).precision == ("bf16" if native else "fp32")
    monkeypatch.setenv(CPU_BF16_ENV, "1")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert not native_bf16(CUDA)  # a GPU answers for itself


def test_the_suite_pins_the_cpu_answer(cpu_bf16: bool) -> None:
    """Every test runs with the answer pinned (conftest), and ``cpu_bf16`` runs a test under both."""
    assert plan(CPU, "auto", False, 100).precision == ("bf16" if cpu_bf16 else "fp32")


def test_forced_precision_wins_over_the_capability(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cpu(monkeypatch, amx=True, avx512_bf16=True)
    assert plan(CPU, "fp32", False, 100).precision == "fp32"
    _fake_cpu(monkeypatch, amx=False, avx512_bf16=False)
    forced = plan(CPU, "bf16", False, 100)
    assert forced.precision == "bf16" and forced.memory_format == torch.channels_last


def test_cuda_auto_is_bf16_channels_last_where_supported(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decided from what torch reports, without a GPU: plan() never touches the device."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    s = plan(CUDA, "auto", None, 64_000)
    assert (s.precision, s.memory_format, s.compile, s.compile_mode) == ("bf16", torch.channels_last, True,
                                                                          "reduce-overhead")
    assert s.tags() == {"precision": "bf16", "memory_format": "channels_last", "compiled": "true",
                        "compile_mode": "reduce-overhead"}
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # pre-Ampere
    assert plan(CUDA, "auto", None, 64_000).precision == "fp32"
    assert plan(CUDA, "auto", False, 64_000).tags()["compile_mode"] == "none"  # nothing compiled, no mode


def test_compile_auto_pays_only_for_long_cpu_runs_and_the_flag_forces_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(speed, "cxx_missing", lambda: None)
    assert not choose_compile(CPU, None, COMPILE_AFTER_ITERATIONS_CPU - 1)
    assert choose_compile(CPU, None, COMPILE_AFTER_ITERATIONS_CPU)
    assert choose_compile(CPU, True, 10) and not choose_compile(CPU, False, 10**6)
    # CUDA (OPEN: a first guess until a GPU measures it): compiled from COMPILE_AFTER_ITERATIONS_CUDA on,
    # whatever the C++ compiler (CUDA kernels are Triton's)
    assert not choose_compile(CUDA, None, COMPILE_AFTER_ITERATIONS_CUDA - 1)
    assert choose_compile(CUDA, None, COMPILE_AFTER_ITERATIONS_CUDA) and not choose_compile(CUDA, False, 10**6)
    monkeypatch.setattr(speed, "cxx_missing", lambda: "g++")
    assert not choose_compile(CPU, None, 10**6)  # auto never picks what cannot build


def test_precision_is_a_validated_training_setting_and_old_compile_values_stay_valid() -> None:
    assert TrainConfig(precision="bf16").config_hash() != TrainConfig(precision="fp32").config_hash()
    assert TrainConfig().to_dict()["precision"] == "auto"
    with pytest.raises(UserError, match="precision must be one of auto, fp32, bf16"):
        TrainConfig(precision="fp16").validate()
    cfg = TrainConfig()
    assert cfg.compile is None  # auto
    assert apply(cfg, {"compile": True}, "x.toml").compile is True  # TOML `compile = true`
    assert apply(cfg, {"compile": "false"}, "--set").compile is False
    assert apply(cfg, {"compile": "auto"}, "--set").compile is None
    assert TrainConfig(compile=True).config_hash() == TrainConfig(compile=None).config_hash()


def test_compile_mode_is_auto_default_or_reduce_overhead_and_not_a_new_training() -> None:
    """auto: CUDA graphs (reduce-overhead) on CUDA, inductor's default on CPU; a speed switch, like compile."""
    assert plan(CPU, "fp32", True, 10).compile_mode == "default"
    assert plan(CUDA, "fp32", True, 10).compile_mode == "reduce-overhead"
    assert plan(CUDA, "fp32", True, 10, "default").compile_mode == "default"
    assert plan(CPU, "fp32", True, 10, "reduce-overhead").tags()["compile_mode"] == "reduce-overhead"
    assert TrainConfig(compile_mode="default").config_hash() == TrainConfig().config_hash()
    assert apply(TrainConfig(), {"compile_mode": "reduce-overhead"}, "--set").validate().compile_mode == \
        "reduce-overhead"
    with pytest.raises(UserError, match="compile_mode must be one of auto, default, reduce-overhead, got 'max'"):
        TrainConfig(compile_mode="max").validate()


def test_compile_mode_reaches_torch_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    """The mode plan decided is the one torch.compile gets (no mode argument for "default")."""
    seen: list[dict] = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: seen.append(kw) or model)
    model = build_model("resnet-8", in_channels=1)
    for mode in ("default", "reduce-overhead"):
        speed.step_model(model, Speed("cuda", "bf16", torch.channels_last, True, mode))
    assert seen == [{"backend": speed.COMPILE_BACKEND}, {"backend": speed.COMPILE_BACKEND, "mode": "reduce-overhead"}]


def _sgd_run(make_opt: object, steps: int = 20) -> list[torch.Tensor]:
    """``steps`` SGD steps of resnet-8 (momentum, weight decay) from fixed weights and batches: the
    weights and momentum buffers at the end."""
    torch.manual_seed(0)
    model = build_model("resnet-8", in_channels=1)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 16, 1, 28, 28, generator=g), torch.randint(0, 10, (8, 16), generator=g)
    params = list(model.parameters())
    opt = make_opt(params)
    for i in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x[i % 8]), y[i % 8]).backward()
        opt.step()
    return [p.detach().clone() for p in params] + [opt.state[p]["momentum_buffer"] for p in params]


def test_the_runs_sgd_is_the_plain_loop_bit_for_bit_on_cpu_and_fused_on_cuda() -> None:
    """Speed.sgd on CPU ends 20 steps in exactly the weights and momentum of torch's per-parameter loop
    (CPU reruns and resumes are exact). The fused form CUDA runs use, run here on the CPU on the same
    gradients for 20 steps, stays within 1e-6 (relative) of it: its multiply-adds round once, so the last
    bits differ (which a net then amplifies, and why the CPU does not use it)."""
    kw = dict(lr=0.1, momentum=0.9, weight_decay=1e-4)
    plain = _sgd_run(lambda p: torch.optim.SGD(p, foreach=False, **kw))
    ours = _sgd_run(lambda p: Speed("cpu", "fp32", torch.channels_last, False).sgd(p, **kw))
    assert all(torch.equal(a, b) for a, b in zip(plain, ours))
    assert sgd_options("cuda") == {"fused": True} and sgd_options("cpu") == {"foreach": False}
    # fused vs the loop on the same gradients (a net's feedback would amplify any last-bit difference)
    g = torch.Generator().manual_seed(2)
    start = [torch.randn(n, generator=g) for n in (10, 1000, 4)]
    grads = [[torch.randn(n, generator=g) for n in (10, 1000, 4)] for _ in range(20)]
    ends = []
    for options in ({"foreach": False}, sgd_options("cuda")):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        opt = torch.optim.SGD(params, **options, **kw)
        for step in grads:
            for p, grad in zip(params, step):
                p.grad = grad.clone()
            opt.step()
        ends.append(torch.cat([p.detach() for p in params]))
    assert torch.allclose(ends[1], ends[0], rtol=1e-6, atol=1e-7)


def test_logits_are_fp32_under_bf16_autocast_and_argmax_matches_an_fp32_head() -> None:
    torch.manual_seed(0)
    model = build_model("resnet-8", in_channels=1).eval()
    x = torch.randn(64, 1, 28, 28)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        features = model.forward_features(x)
        logits = model.forward_head(features)
    assert features.dtype == torch.bfloat16 and logits.dtype == torch.float32
    with torch.no_grad():
        fp32_head = model.fc(torch.flatten(model.pool(features.float()), 1))
    assert torch.equal(logits, fp32_head) and torch.equal(logits.argmax(1), fp32_head.argmax(1))


def test_a_compile_failure_runs_eager_after_one_warning_line(monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    def broken(gm: torch.fx.GraphModule, example_inputs: list) -> None:
        raise RuntimeError("no kernels today\nsecond line of a long trace")

    monkeypatch.setattr(speed, "COMPILE_BACKEND", broken)
    torch.manual_seed(0)
    model = build_model("resnet-8", in_channels=1)
    step = CompiledStep(model)
    x = torch.randn(8, 1, 28, 28)
    with caplog.at_level(logging.WARNING, logger="resnet_lab.speed"):
        first, second = step(x), step(x)
    assert not step.compiled
    assert [r.getMessage().count("\n") for r in caplog.records] == [0]
    assert "torch.compile failed" in caplog.text and "training continues eager" in caplog.text
    assert torch.equal(first, model(x)) and torch.equal(second, model(x))  # train mode: batch statistics


# Ten different nets: each a new graph for ResNet.forward (torch's recompile limit is 8).
TEN_NETS = [("resnet-8", "A"), ("resnet-8", "B"), ("resnet-8", "C"), ("plain-8", None), ("resnet-14", "A"),
            ("resnet-14", "B"), ("resnet-14", "C"), ("plain-14", None), ("resnet-20", "A"), ("plain-20", None)]


def test_an_inline_study_of_ten_nets_compiles_every_net(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 15: without fresh compiler caches per run, nets 9 and 10 would run eager, silently.

    Each net is set up as ``train`` does (``prepare``, ``start``) and takes two SGD steps; the
    backend records each graph dynamo hands it and runs it as traced (inductor would spend
    minutes compiling the same graphs; dynamo's recompile limit is hit before any backend)."""
    graphs: list[int] = []

    def counting(gm: torch.fx.GraphModule, example_inputs: list):
        graphs.append(len(gm.graph.nodes))
        return gm.forward

    monkeypatch.setattr(speed, "COMPILE_BACKEND", counting)
    per_net = []
    for model, shortcut in TEN_NETS:
        before = len(graphs)
        cfg = TrainConfig(model=model, shortcut=shortcut, dataset="synthetic", iterations=2, batch_size=4,
                          probes=False, compile=True, device="cpu", checkpoint_every=0)
        setup = prepare(cfg)
        group = start([setup])
        batches = group.states[0].loader.batches()
        for _ in range(2):
            train_step(group.model, group.states, setup.cfg, [next(batches)], setup.speed)
        per_net.append(len(graphs) - before)
        assert group.model.compiled
    assert all(n >= 1 for n in per_net), per_net


@pytest.mark.slow
@pytest.mark.skipif(not cpu_bf16_units(), reason="this CPU has no native bf16 (AMX or AVX512-BF16): bf16 is "
                    "emulated op by op here, auto never picks it, and 4 runs would take many minutes")
def test_bf16_trains_like_fp32_on_real_fashion_mnist(fashion_mnist_dir: Path, tracking_uri: str) -> None:
    """300 iterations of resnet-8: bf16 and fp32 from the same seed end closer than fp32 seeds do."""
    base = TrainConfig(model="resnet-8", dataset="fashion-mnist", data_dir=str(fashion_mnist_dir), iterations=300,
                       batch_size=64, log_every=50, eval_every=300, probes=False, checkpoint_every=0, device="cpu",
                       compile=False, tracking_uri=tracking_uri, experiment="bf16-vs-fp32", progress=False)

    def final_loss(**changes: object) -> float:
        result = train(dataclasses.replace(base, **changes))
        assert result.status == "FINISHED"
        return result.metrics["train/loss"]  # mean over the last 50 iterations

    fp32 = [final_loss(precision="fp32", seed=s) for s in (0, 1, 2)]
    bf16 = final_loss(precision="bf16", seed=0)
    spread = max(fp32) - min(fp32)
    assert abs(bf16 - fp32[0]) < spread, (bf16, fp32)


def test_evaluation_runs_in_the_run_precision_and_the_tags_say_which() -> None:
    """A forced bf16 run (emulated on a CPU without it: kept tiny) evaluates under bf16 autocast
    with fp32 logits, and its tags name the precision, layout and compile it used."""
    cfg = TrainConfig(model="resnet-8", dataset="synthetic", iterations=4, batch_size=16, precision="bf16",
                      compile=False, device="cpu", checkpoint_every=0, progress=False)
    setup = prepare(cfg)
    tags = run_tags(setup)
    assert (tags["precision"], tags["memory_format"], tags["compiled"]) == ("bf16", "channels_last", "false")
    split = Split(setup.data.test.images[:40], setup.data.test.labels[:40])
    loader = DeviceLoader(split, batch_size=20, device=CPU, mean=setup.data.mean, std=setup.data.std, train=False)
    loss, error = evaluate(setup.model, loader, setup.speed)
    model = setup.model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = torch.cat([model(x.contiguous(memory_format=torch.channels_last)) for x, _ in loader])
    assert logits.dtype == torch.float32
    assert loss == pytest.approx(F.cross_entropy(logits, split.labels).item(), rel=1e-5)
    assert error == pytest.approx(100.0 * (logits.argmax(1) != split.labels).float().mean().item())


def test_fuse_rule_forces_on_and_off_and_never_fuses_one_net() -> None:
    """--fuse on|off force it; auto fuses on CPU with 2+ threads (measured faster) but not with one
    (measured slower), and on CUDA (unmeasured: HFTA's evidence); a lone net has nothing to fuse with."""
    from resnet_lab.speed import FUSE_CHOICES, choose_fuse
    assert FUSE_CHOICES == ("auto", "on", "off")
    assert choose_fuse(CPU, "auto", 6, threads=2) and not choose_fuse(CPU, "auto", 6, threads=1)
    assert choose_fuse(CUDA, "auto", 6) and choose_fuse(CPU, "on", 2, threads=1)
    for device in (CPU, CUDA):
        assert not choose_fuse(device, "off", 6, threads=2)
        assert not any(choose_fuse(device, asked, 1, threads=2) for asked in FUSE_CHOICES)
    assert not choose_fuse(torch.device("mps"), "auto", 6)  # never measured: stays unfused
    assert choose_fuse(torch.device("mps"), "on", 6)

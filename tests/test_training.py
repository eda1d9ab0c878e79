"""Training from BasicSR option files: options, a smoke run of the fused model, exact resume, DDP on gloo."""
from __future__ import annotations

import collections
import logging
import math
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

import rgt_fast
from rgt_fast.checkpoint import DERIVED_BUFFERS
from rgt_fast.cli import main
from rgt_fast.config import preset_kwargs
from rgt_fast.training.checkpoints import ExperimentPaths, archive_existing
from rgt_fast.training.options import (OptionError, load_test_options, load_train_options, network_kwargs)
from rgt_fast.training.trainer import LearningRateSchedule, Trainer
from test_data import write_benchmark_set

REPO = Path(__file__).resolve().parents[1]
OPTIONS = REPO / "train" / "options"
SMOKE = OPTIONS / "smoke_cpu.yml"


@pytest.fixture
def smoke_dir(tmp_path, monkeypatch):
    """A working directory holding the datasets/smoke images that smoke_cpu.yml points at."""
    write_benchmark_set(tmp_path / "datasets" / "smoke", 2, [(36, 42)] * 4)
    monkeypatch.chdir(tmp_path)
    return tmp_path


# Tiny models: extra threads only add contention on shared cores, and one thread makes CPU reductions
# bitwise reproducible, which the resume checks need.
pytestmark = pytest.mark.usefixtures("single_thread")


def train(*overrides: str, auto_resume: bool = False) -> int:
    return main(["train", "-opt", str(SMOKE), *(["--auto_resume"] if auto_resume else []), "--force_yml", *overrides])


def log_text(name: str) -> str:
    return "\n".join(p.read_text() for p in sorted(Path("experiments", name).glob(f"train_{name}_*.log")))


def write_options(path: Path, edit) -> Path:
    options = yaml.safe_load(SMOKE.read_text())
    edit(options)
    path.write_text(yaml.safe_dump(options))
    return path


# ------------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize("preset,tag", [("RGT", "RGT"), ("RGT-S", "RGT_S")])
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_shipped_option_files_load_cleanly_and_describe_the_presets(preset, tag, scale, caplog):
    with caplog.at_level(logging.WARNING, logger="rgt_fast"):
        train_options = load_train_options(OPTIONS / f"train_{tag}_x{scale}.yml")
        test_options = load_test_options(OPTIONS / f"test_{tag}_x{scale}.yml")
    assert not caplog.records
    expected = preset_kwargs(preset, scale)
    for options in (train_options, test_options):
        kwargs = network_kwargs(options["network_g"])
        assert {k: expected[k] for k in kwargs} == kwargs
    assert train_options["datasets"]["train"]["dataroot_gt"] == "datasets/DF2K/HR"
    assert train_options["datasets"]["train"]["gt_size"] == 64 * scale
    assert train_options["val"]["val_freq"] == 5000 and train_options["train"]["optim_g"]["lr"] == 2e-4
    assert [d["name"] for d in test_options["datasets"].values()] == ["Set5", "Set14", "B100", "Urban100",
                                                                     "Manga109"]


def test_unknown_keys_are_reported_in_one_warning(tmp_path, caplog):
    def edit(options):
        options["datasets"]["train"]["use_hfilp"] = True
        options["train"]["optim_g"]["momentum"] = 0.9
        options["debug"] = True
    path = write_options(tmp_path / "o.yml", edit)
    with caplog.at_level(logging.WARNING, logger="rgt_fast"):
        options = load_train_options(path)
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    for key in ("datasets.train.use_hfilp", "train.optim_g.momentum", "debug"):
        assert key in message
    assert "use_hfilp" not in options["datasets"]["train"] and options["datasets"]["train"]["use_hflip"] is True


@pytest.mark.parametrize("path", ["train.optim_g.lr", "datasets.train.gt_size", "network_g", "name",
                                  "datasets.val.dataroot_gt"])
def test_a_missing_required_key_is_an_error_naming_it(tmp_path, path):
    def edit(options):
        *parents, key = path.split(".")
        section = options
        for parent in parents:
            section = section[parent]
        del section[key]
    with pytest.raises(OptionError, match=f"missing required option {path}$"):
        load_train_options(write_options(tmp_path / "o.yml", edit))


def test_force_yml_overrides_with_yaml_values():
    options = load_train_options(SMOKE, ["train.total_iter=10", "train:ema_decay=0.5", "network_g.depth=[1, 1]",
                                         "datasets.train.use_rot=false", "train.amp=bf16", "train.optim_g.lr=1e-3",
                                         "path.experiments_root=/tmp/x"])
    assert options["train"]["total_iter"] == 10 and options["train"]["ema_decay"] == 0.5
    assert options["network_g"]["depth"] == [1, 1] and options["datasets"]["train"]["use_rot"] is False
    assert options["train"]["amp"] == "bf16" and options["train"]["optim_g"]["lr"] == 1e-3
    assert options["path"]["experiments_root"] == "/tmp/x"
    with pytest.raises(OptionError, match="key.path=value"):
        load_train_options(SMOKE, ["train.total_iter"])
    with pytest.raises(OptionError, match="whole number"):
        load_train_options(SMOKE, ["train.total_iter=2.5"])


def test_force_yml_takes_a_value_yaml_cannot_parse_as_a_string_as_basicsr():
    options = load_train_options(SMOKE, ["datasets.train.filename_tmpl={}_x2"])
    assert options["datasets"]["train"]["filename_tmpl"] == "{}_x2"


@pytest.mark.parametrize("override,message", [
    ("datasets.train.batch_size_per_gpu=0", "batch_size_per_gpu must be at least 1, got 0"),
    ("datasets.train.num_worker_per_gpu=-1", "num_worker_per_gpu must be at least 0, got -1"),
    ("datasets.train.gt_size=4", "gt_size must be a multiple of scale 2 and at least 8 .* got 4"),
    ("datasets.train.gt_size=33", "gt_size must be a multiple of scale 2 .* got 33"),
    ("train.ema_decay=1.5", r"ema_decay must lie in \[0, 1\) .* got 1.5"),
    ("train.optim_g.lr=-1", "lr must be positive, got -1"),
])
def test_values_out_of_range_are_errors_naming_the_option(override, message):
    with pytest.raises(OptionError, match=message):
        load_train_options(SMOKE, [override])


def test_optimizer_is_fused_on_cuda_by_default_and_as_asked():
    """``train.optim_g.fused``: None means fused on CUDA parameters and PyTorch's own choice elsewhere; an explicit
    value is passed on. Fused and unfused Adam take the same step up to rounding."""
    from rgt_fast.training.trainer import build_optimizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    spec = dict(type="Adam", lr=1e-2, weight_decay=0.0, betas=[0.9, 0.999], eps=1e-8, amsgrad=False, fused=None)
    nets = [torch.nn.Linear(5, 3).to(device) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    default = build_optimizer(nets[0], spec)
    assert default.defaults["fused"] == (True if device == "cuda" else None)
    explicit = build_optimizer(nets[1], {**spec, "fused": device != "cuda"})
    assert explicit.defaults["fused"] == (device != "cuda")
    x = torch.randn(4, 5, device=device)
    for net, optimizer in zip(nets, (default, explicit)):
        for _ in range(3):
            optimizer.zero_grad()
            net(x).square().sum().backward()
            optimizer.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def multi_step(milestones, gamma=0.5, restarts=(0,), restart_weights=(1.0,)):
    return {"type": "MultiStepLR", "milestones": list(milestones), "gamma": gamma, "restarts": list(restarts),
            "restart_weights": list(restart_weights)}


def test_learning_rate_follows_warmup_and_milestones():
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    steps = LearningRateSchedule(optimizer, multi_step([3, 5]), warmup_iter=-1)
    assert [steps.learning_rate(1.0, k) for k in range(1, 8)] == [1, 1, 1, 0.5, 0.5, 0.25, 0.25]
    warm = LearningRateSchedule(optimizer, multi_step([6]), warmup_iter=4)
    assert [warm.learning_rate(1.0, k) for k in range(1, 8)] == [0.25, 0.5, 0.75, 1, 1, 1, 0.5]
    warm.apply(2)
    assert optimizer.param_groups[0]["lr"] == 0.5


def test_multi_step_restarts_reset_to_their_weight_and_drop_from_there():
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = LearningRateSchedule(optimizer, multi_step([2, 5], 0.5, restarts=[0, 4], restart_weights=[1, 0.8]), -1)
    # Iteration k is BasicSR's scheduler step k - 1: the restart at step 4 shows at iteration 5.
    assert [schedule.learning_rate(1.0, k) for k in range(1, 8)] == [1, 1, 0.5, 0.5, 0.8, 0.4, 0.4]


def test_cosine_annealing_restarts_by_hand():
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1.1)
    spec = {"type": "CosineAnnealingRestartLR", "periods": [4, 6], "restart_weights": [1.0, 0.5], "eta_min": 0.1}
    schedule = LearningRateSchedule(optimizer, spec, warmup_iter=-1)
    # Steps 0-4 anneal 1.1 to 0.1 (step 4 still in the first period); then from 0.1 + 0.5 * 1.0 over 6 steps.
    expected = {1: 1.1, 2: 0.953553390593, 3: 0.6, 4: 0.246446609407, 5: 0.1, 6: 0.566506350946, 8: 0.35, 11: 0.1}
    assert {k: schedule.learning_rate(1.1, k) for k in expected} == pytest.approx(expected, abs=1e-12)


def cosine_options(**overrides):
    def edit(options):
        options["train"]["scheduler"] = {"type": "CosineAnnealingRestartLR", "periods": [250000, 250000],
                                         "restart_weights": [1, 0.5], "eta_min": 1e-7, **overrides}
    return edit


def test_scheduler_keys_depend_on_its_type(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="rgt_fast"):
        options = load_train_options(write_options(tmp_path / "cos.yml", cosine_options()))
    assert not caplog.records
    assert options["train"]["scheduler"] == {"type": "CosineAnnealingRestartLR", "periods": [250000, 250000],
                                             "restart_weights": [1.0, 0.5], "eta_min": 1e-7}
    with caplog.at_level(logging.WARNING, logger="rgt_fast"):
        load_train_options(write_options(tmp_path / "mixed.yml", cosine_options(milestones=[3])))
    assert "train.scheduler.milestones" in caplog.text
    restart = load_train_options(SMOKE, ["train.scheduler.type=MultiStepRestartLR"])["train"]["scheduler"]
    assert restart == {**multi_step([3], 0.5), "type": "MultiStepRestartLR"}


@pytest.mark.parametrize("edit,message", [
    (cosine_options(periods=None), "missing required option train.scheduler.periods$"),
    (cosine_options(restart_weights=[1]), "gives 1 weight.* for 2 period"),
    (cosine_options(periods=[1, 1]), "periods end at iteration 3, before train.total_iter 4"),
    (cosine_options(periods=500000), "periods must be a list"),
    (lambda options: options["train"]["scheduler"].update(restarts=[0, 2]), "gives 1 weight.* for 2 restart"),
    (lambda options: options["train"]["scheduler"].update(type="StepLR"),
     r"train.scheduler.type: 'StepLR' is not supported; use one of \['MultiStepLR'"),
])
def test_scheduler_errors_say_what_to_change(tmp_path, edit, message):
    with pytest.raises(OptionError, match=message):
        load_train_options(write_options(tmp_path / "o.yml", edit))


# ------------------------------------------------------------------------------------------------ training
def test_smoke_run_writes_basicsr_checkpoints(smoke_dir):
    assert train("train.total_iter=4", "logger.use_tb_logger=true") == 0
    paths = ExperimentPaths(Path("experiments/smoke_cpu"))
    assert sorted(p.name for p in paths.models.iterdir()) == ["net_g_2.pth", "net_g_4.pth", "net_g_latest.pth"]
    assert sorted(p.name for p in paths.training_states.iterdir()) == ["2.state", "4.state"]
    weights = torch.load(paths.net_file(4), weights_only=True)
    assert set(weights) == {"params", "params_ema"}
    model = rgt_fast.load_model(paths.net_file(4))
    assert isinstance(model, rgt_fast.RGT) and model.upscale == 2
    state = torch.load(paths.state_file(4), weights_only=True)
    assert state["iter"] == 4 and state["epoch"] == 1 and set(state["rng"][0]) >= {"python", "numpy", "torch"}
    log = log_text("smoke_cpu")
    assert "iter 4/4, lr 1.000e-04" in log and "it/s, eta" in log
    assert "validation smoke_val at iter 4: psnr" in log and "best" in log
    assert (paths.root / "tb_logger").is_dir() or "TensorBoard is not installed" in log


def test_path_resume_state_resumes_from_that_state(smoke_dir):
    assert train("train.total_iter=4", "val=null") == 0
    resume_state = "path.resume_state=experiments/smoke_cpu/training_states/2.state"
    assert train("train.total_iter=5", "val=null", resume_state) == 0
    log = log_text("smoke_cpu")
    assert "resuming from iteration 2 " in log and "iterations 3 to 5" in log


def test_resume_continues_exactly_like_an_uninterrupted_run(smoke_dir):
    # The uninterrupted run loads data in two worker processes, the interrupted one in the main process:
    # batches depend on (seed, epoch, position) only.
    assert train("name=full", "train.total_iter=6", "datasets.train.num_worker_per_gpu=2") == 0
    assert train("name=part", "train.total_iter=3") == 0
    assert train("name=part", "train.total_iter=6", auto_resume=True) == 0
    log = log_text("part")
    assert "resuming from iteration 3 (epoch 1)" in log and "iterations 4 to 6" in log
    assert "iter 4/6, lr 1.000e-04" in log  # the milestone at 3 applies from iteration 4, after the resume

    full, part = ExperimentPaths(Path("experiments/full")), ExperimentPaths(Path("experiments/part"))
    for name in (6, "latest"):
        expected, resumed = (torch.load(p.net_file(name), weights_only=True) for p in (full, part))
        for key in ("params", "params_ema"):
            for tensor in expected[key]:
                assert torch.equal(expected[key][tensor], resumed[key][tensor]), (key, tensor)
    expected, resumed = (torch.load(p.state_file(6), weights_only=True) for p in (full, part))
    assert (resumed["iter"], resumed["epoch"], resumed["samples_into_epoch"]) == (6, 2, 4)
    assert (expected["epoch"], expected["samples_into_epoch"]) == (2, 4)
    assert resumed["optimizers"][0]["param_groups"] == expected["optimizers"][0]["param_groups"]
    for index, values in expected["optimizers"][0]["state"].items():
        for key, tensor in values.items():
            assert torch.equal(tensor, resumed["optimizers"][0]["state"][index][key])
    assert torch.equal(expected["rng"][0]["torch"], resumed["rng"][0]["torch"])


def test_a_cosine_schedule_resumes_exactly(smoke_dir):
    cosine = ("train.scheduler={type: CosineAnnealingRestartLR, periods: [2, 4], restart_weights: [1, 0.5], "
              "eta_min: 1.0e-5}")
    schedule = [cosine, "train.total_iter=6", "val=null"]
    assert train("name=full", *schedule) == 0
    assert train("name=part", *schedule, "train.total_iter=3") == 0
    assert train("name=part", *schedule, auto_resume=True) == 0
    base, eta_min = 2e-4, 1e-5
    for iteration in range(1, 7):
        step = iteration - 1
        start, period, weight = (0, 2, 1.0) if step <= 2 else (2, 4, 0.5)
        lr = eta_min + weight * 0.5 * (base - eta_min) * (1 + math.cos(math.pi * (step - start) / period))
        assert f"iter {iteration}/6, lr {lr:.3e}" in log_text("full")
        assert f"iter {iteration}/{3 if iteration <= 3 else 6}, lr {lr:.3e}" in log_text("part")
    expected, resumed = (torch.load(f"experiments/{name}/models/net_g_6.pth", weights_only=True)["params"]
                         for name in ("full", "part"))
    assert all(torch.equal(expected[key], resumed[key]) for key in expected)
    assert "schedule differs" not in log_text("part")


def basicsr_state(state_path: Path, scheduler_state: dict) -> dict:
    """A training state as BasicSR writes it, from one of ours: epoch, iteration, optimizers, schedulers only."""
    ours = torch.load(state_path, weights_only=True)
    return {"epoch": ours["epoch"], "iter": ours["iter"], "optimizers": ours["optimizers"],
            "schedulers": [scheduler_state]}


def test_a_basicsr_state_resumes_with_its_optimizer_and_a_warning(smoke_dir):
    assert train("train.total_iter=2", "val=null") == 0
    paths = ExperimentPaths(Path("experiments/smoke_cpu"))
    # What BasicSR's MultiStepRestartLR saves for smoke_cpu.yml's schedule (milestones [3], gamma 0.5).
    scheduler_state = {"milestones": collections.Counter([3]), "gamma": 0.5, "restarts": [0], "restart_weights": [1],
                       "base_lrs": [2e-4], "last_epoch": 1, "_step_count": 2, "_last_lr": [2e-4]}
    torch.save(basicsr_state(paths.state_file(2), scheduler_state), paths.state_file(2))
    saved = torch.load(paths.state_file(2), weights_only=True)
    trainer = Trainer(load_train_options(SMOKE, ["train.total_iter=4", "val=null",
                                                 f"path.resume_state={paths.state_file(2)}"]))
    try:
        assert saved["epoch"] == 0
        assert (trainer.iteration, trainer.epoch, trainer.samples_into_epoch, trainer.best) == (2, 1, 0, {})
        restored = trainer.optimizer.state_dict()["state"]
        for index, values in saved["optimizers"][0]["state"].items():
            assert all(torch.equal(tensor, restored[index][key]) for key, tensor in values.items())
        assert restored[0]["step"] == 2
        trainer.fit()
    finally:
        trainer.close()
    log = log_text("smoke_cpu")
    assert "(a BasicSR state): resuming at iteration 2" in log and "from the start of epoch 1" in log
    assert "iterations 3 to 4" in log and "iter 4/4, lr 1.000e-04" in log
    assert "schedule differs" not in log
    assert paths.net_file(4).is_file()


def test_a_changed_schedule_is_named_when_resuming_a_basicsr_state(smoke_dir, caplog):
    assert train("train.total_iter=2", "val=null") == 0
    paths = ExperimentPaths(Path("experiments/smoke_cpu"))
    scheduler_state = {"milestones": collections.Counter([3, 3]), "gamma": 0.5, "base_lrs": [2e-4]}
    torch.save(basicsr_state(paths.state_file(2), scheduler_state), paths.state_file(2))
    with caplog.at_level(logging.WARNING, logger="rgt_fast"):
        Trainer(load_train_options(SMOKE, ["val=null", f"path.resume_state={paths.state_file(2)}"])).close()
    assert "schedule differs from the saved run's (milestones Counter({3: 2}) -> [3])" in caplog.text


def test_auto_resume_falls_back_from_an_unreadable_state(smoke_dir):
    assert train("train.total_iter=4", "val=null") == 0
    paths = ExperimentPaths(Path("experiments/smoke_cpu"))
    latest = paths.state_file(4)
    latest.write_bytes(latest.read_bytes()[:100])
    # The warnings come before the run's log file is opened, and still reach it.
    assert train("train.total_iter=5", "val=null", "train.unknown_key=1", auto_resume=True) == 0
    log = log_text("smoke_cpu")
    assert f"auto_resume: {latest}: cannot read it" in log and "trying the state before it" in log
    assert "ignoring unknown option(s): train.unknown_key" in log
    assert "resuming from iteration 2 " in log and "iterations 3 to 5" in log
    for state in paths.training_states.iterdir():
        state.write_bytes(b"")
    with pytest.raises(rgt_fast.CheckpointError, match="none of the 3 training state"):
        Trainer(load_train_options(SMOKE, ["val=null"]), auto_resume=True)


def test_auto_resume_falls_back_from_a_state_whose_weights_are_missing(smoke_dir):
    assert train("train.total_iter=4", "val=null") == 0
    missing = Path("experiments/smoke_cpu/models/net_g_4.pth")
    missing.unlink()
    assert train("train.total_iter=5", "val=null", auto_resume=True) == 0
    log = log_text("smoke_cpu")
    assert f"4.state belongs with {missing.resolve()}, which does not exist; trying the state before it" in log
    assert "resuming from iteration 2 " in log


def test_resuming_with_another_network_is_an_error_naming_the_weights(smoke_dir):
    assert train("train.total_iter=2", "val=null") == 0
    with pytest.raises(rgt_fast.CheckpointError, match=r"net_g_2\.pth: does not fit network_g .*shape mismatches.*"
                                                       r"restore its options"):
        Trainer(load_train_options(SMOKE, ["val=null", "network_g.embed_dim=24"]), auto_resume=True)


def test_a_run_that_cannot_start_leaves_the_previous_experiment_in_place(smoke_dir, capsys):
    assert train("train.total_iter=1", "val=null") == 0
    assert train("train.total_iter=1", "val=null", "train.amp=fp32") == 1
    assert "option train.amp: 'fp32' is not supported" in capsys.readouterr().err
    assert not list(Path("experiments").glob("smoke_cpu_archived_*"))
    assert Path("experiments/smoke_cpu/models/net_g_1.pth").is_file()


def test_a_trainer_built_in_python_logs_its_setup_into_the_run_log(smoke_dir, monkeypatch):
    from rgt_fast.training.logs import PACKAGE_LOGGER
    monkeypatch.setattr(PACKAGE_LOGGER, "level", logging.WARNING)  # a library user's default
    trainer = Trainer(load_train_options(SMOKE, ["train.total_iter=1", "val=null"]))
    try:
        trainer.fit()
    finally:
        trainer.close()
    log = log_text("smoke_cpu")
    assert "options:\nname: smoke_cpu" in log and "network: fused RGT" in log and "training done" in log


def test_why_training_stopped_is_in_the_log_file(smoke_dir, capsys):
    for image in Path("datasets/smoke/HR").iterdir():
        image.write_bytes(b"not an image")
    assert train("train.total_iter=2", "val=null", "datasets.train.dataroot_lq=null") == 1
    message = "none of the 4 training images in datasets/smoke/HR can be used"
    assert message in capsys.readouterr().err
    assert f"ERROR: training stopped: {message}" in log_text("smoke_cpu")


def test_resume_state_must_name_a_training_state(smoke_dir):
    assert train("train.total_iter=2", "val=null") == 0
    net_file = "experiments/smoke_cpu/models/net_g_2.pth"
    with pytest.raises(rgt_fast.CheckpointError, match=f"{net_file}: not a training state"):
        Trainer(load_train_options(SMOKE, ["val=null", f"path.resume_state={net_file}"]))


def test_amp_fp16_with_gradient_checkpointing_and_warmup(smoke_dir):
    assert train("train.total_iter=2", "train.amp=fp16", "network_g.use_chk=true", "train.warmup_iter=2",
                 "val=null") == 0
    state = torch.load("experiments/smoke_cpu/training_states/2.state", weights_only=True)
    assert state["grad_scaler"]["scale"] > 0
    assert "iter 1/2, lr 1.000e-04" in log_text("smoke_cpu")


def poison_losses(monkeypatch, iterations):
    """Make the loss NaN at these iterations, as a diverging run's would become."""
    compute_loss = Trainer._loss

    def loss(self, lq, gt):
        value = compute_loss(self, lq, gt)
        return value * float("nan") if self.iteration in iterations else value
    monkeypatch.setattr(Trainer, "_loss", loss)


@pytest.mark.parametrize("print_freq, save_freq", [(4, 2), (100, 4)], ids=["at the log", "at the save"])
def test_a_non_finite_loss_stops_training_before_spoilt_weights_are_saved(smoke_dir, monkeypatch, print_freq,
                                                                          save_freq):
    poison_losses(monkeypatch, {3})
    assert train("train.total_iter=8", f"logger.print_freq={print_freq}",
                 f"logger.save_checkpoint_freq={save_freq}", "val=null") == 1
    log = log_text("smoke_cpu")
    # Iteration 3's update spoilt the weights, so iteration 4's loss is NaN too.
    assert "training diverged: the loss was not finite in 2 of the 4 steps up to iteration 4" in log
    assert "Nothing after iteration 2 is saved" in log if save_freq == 2 else "after iteration 0" in log
    models = sorted(p.name for p in Path("experiments/smoke_cpu/models").glob("net_g_*.pth"))
    assert models == (["net_g_2.pth", "net_g_latest.pth"] if save_freq == 2 else [])
    for path in Path("experiments/smoke_cpu/models").glob("*.pth"):
        params = torch.load(path, weights_only=True)["params"]
        assert all(torch.isfinite(t).all() for t in params.values())


def test_fp16_loss_scaling_outlives_a_non_finite_loss_but_not_a_run_of_them(smoke_dir, monkeypatch):
    poison_losses(monkeypatch, {3})
    assert train("train.total_iter=4", "train.amp=fp16", "logger.print_freq=2", "val=null") == 0
    assert "1 of the last 2 steps had a non-finite loss; fp16 loss scaling skipped their updates" in log_text(
        "smoke_cpu")
    params = torch.load("experiments/smoke_cpu/models/net_g_4.pth", weights_only=True)["params"]
    assert all(torch.isfinite(t).all() for t in params.values())
    poison_losses(monkeypatch, {5, 6})
    assert train("name=fp16_run", "train.total_iter=6", "train.amp=fp16", "logger.print_freq=2", "val=null") == 1
    assert "not finite in 2 of the 2 steps up to iteration 6" in log_text("fp16_run")
    assert "or train.amp: bf16" in log_text("fp16_run")


def test_hr_only_training_skips_a_corrupt_image_by_name(smoke_dir):
    Path("datasets/smoke/HR/img01.png").write_bytes(b"\x89PNG truncated")
    assert train("train.total_iter=4", "datasets.train.type=SingleHRDataset", "datasets.train.dataroot_lq=null",
                 "datasets.val.type=SingleHRDataset") == 0
    log = log_text("smoke_cpu")
    assert "skipping training image" in log and "img01.png" in log
    assert "cannot evaluate img01" in log and "validation smoke_val at iter 4" in log


def test_the_reference_model_trains_with_fast_false(smoke_dir):
    options = load_train_options(SMOKE, ["train.total_iter=1", "network_g.fast=false", "val=null"])
    trainer = Trainer(options)
    try:
        assert type(trainer.net) is rgt_fast.reference.RGT
        trainer.fit()
    finally:
        trainer.close()
    assert trainer.iteration == 1


def test_finetuning_from_another_scale_skips_mismatched_weights(smoke_dir, caplog):
    source = rgt_fast.create_model_from_kwargs(network_kwargs(load_train_options(SMOKE)["network_g"]))
    rgt_fast.save_state_dict(source.state_dict(), "x2.pth")
    overrides = ["scale=3", "network_g.upscale=3", "path.pretrain_network_g=x2.pth", "val=null",
                 "datasets.train.type=SingleHRDataset", "datasets.train.gt_size=30"]
    with pytest.raises(rgt_fast.CheckpointError, match="strict_load_g"):
        Trainer(load_train_options(SMOKE, overrides))
    assert not [h for h in logging.getLogger("rgt_fast").handlers if isinstance(h, logging.FileHandler)]
    with caplog.at_level(logging.WARNING, logger="rgt_fast"):
        trainer = Trainer(load_train_options(SMOKE, [*overrides, "path.strict_load_g=false"]))
    trainer.close()
    assert "different shape" in caplog.text and "upsample.0.weight" in caplog.text
    assert torch.equal(trainer.net.conv_first.weight, source.conv_first.weight)


def state_dicts_equal(module: torch.nn.Module, expected: dict[str, torch.Tensor]) -> bool:
    actual = module.state_dict()
    return all(torch.equal(actual[key], value) for key, value in expected.items())


def test_pretrained_weights_follow_param_key_g_and_seed_the_ema(smoke_dir, caplog):
    kwargs = network_kwargs(load_train_options(SMOKE)["network_g"])
    params, params_ema = (rgt_fast.create_model_from_kwargs(kwargs, fused=False).state_dict() for _ in range(2))
    torch.save({"params": params, "params_ema": params_ema}, "both.pth")
    rgt_fast.save_state_dict(params, "params_only.pth")

    def pretrained(name, *overrides):
        trainer = Trainer(load_train_options(SMOKE, ["val=null", f"name={name}", *overrides]))
        trainer.close()
        return trainer.net, trainer.ema.model

    with caplog.at_level(logging.WARNING, logger="rgt_fast"):
        net, ema = pretrained("default", "path.pretrain_network_g=both.pth")
    assert not caplog.records  # param_key_g is a known option
    assert state_dicts_equal(net, params) and state_dicts_equal(ema, params_ema)
    net, ema = pretrained("ema", "path.pretrain_network_g=both.pth", "path.param_key_g=params_ema")
    assert state_dicts_equal(net, params_ema) and state_dicts_equal(ema, params_ema)
    net, ema = pretrained("fallback", "path.pretrain_network_g=params_only.pth", "path.param_key_g=params_ema")
    assert state_dicts_equal(net, params) and state_dicts_equal(ema, params)


def test_strict_finetuning_from_exported_weights_fills_the_derived_buffers(smoke_dir):
    demo = REPO / "rgt_fast" / "weights" / "demo_RGT_x2.safetensors"
    weights = rgt_fast.read_state_dict(demo)
    assert not any(key.endswith(DERIVED_BUFFERS) for key in weights)
    demo_network = yaml.safe_load((OPTIONS / "demo_RGT_x2.yml").read_text())["network_g"]
    trainer = Trainer(load_train_options(SMOKE, ["val=null", f"path.pretrain_network_g={demo}",
                                                 f"network_g={yaml.safe_dump(demo_network, default_flow_style=True)}"]))
    trainer.close()
    assert state_dicts_equal(trainer.net, weights) and state_dicts_equal(trainer.ema.model, weights)


def test_archives_of_the_same_second_get_numbered_names_whatever_dots_the_name_has(tmp_path, monkeypatch):
    monkeypatch.setattr(time, "strftime", lambda _format: "20261128_120000")
    names = []
    for _ in range(3):
        (tmp_path / "RGT.x2").mkdir()
        names.append(archive_existing(tmp_path / "RGT.x2").name)
    stamped = "RGT.x2_archived_20261128_120000"
    assert names == [stamped, f"{stamped}.2", f"{stamped}.3"]


def test_a_second_run_of_the_same_name_archives_the_first(smoke_dir):
    assert train("train.total_iter=1", "val=null") == 0
    assert train("train.total_iter=1", "val=null") == 0
    assert len(list(Path("experiments").glob("smoke_cpu_archived_*"))) == 1


# ---------------------------------------------------------------------------------------------------- DDP
DDP_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import torch.distributed as dist
    from rgt_fast.training.options import load_train_options
    from rgt_fast.training.trainer import Trainer

    trainer = Trainer(load_train_options(sys.argv[1], sys.argv[3:]), launcher="pytorch")
    try:
        trainer.fit()
        torch.save(trainer.net.state_dict(), f"{sys.argv[2]}/rank{dist.get_rank()}.pt")
    finally:
        trainer.close()
""")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_on_gloo_keeps_ranks_identical(smoke_dir):
    script = smoke_dir / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(script), str(SMOKE), str(smoke_dir), "name=ddp",
               "train.total_iter=2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(smoke_dir / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    saved = torch.load("experiments/ddp/models/net_g_2.pth", weights_only=True)["params"]
    assert all(torch.equal(saved[k], rank0[k]) for k in rank0)
    state = torch.load("experiments/ddp/training_states/2.state", weights_only=True)
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    assert len(list(Path("experiments/ddp").glob("*.log"))) == 1


def test_entry_script_trains_and_reports_option_errors(smoke_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = [sys.executable, str(REPO / "train" / "train.py"), "-opt", str(SMOKE)]
    done = subprocess.run([*script, "--force_yml", "train.total_iter=1", "val=null"], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "iter 1/1" in done.stderr and Path("experiments/smoke_cpu/models/net_g_1.pth").is_file()
    bad = subprocess.run([*script, "--force_yml", "train.optim_g.lr=null"], capture_output=True, text=True,
                         timeout=120, env=env)
    assert bad.returncode == 1 and "missing required option train.optim_g.lr" in bad.stderr

"""The training step recorded as a CUDA graph (rgt_fast.training.cuda_graph) and how the trainer uses it.

Recording needs a GPU. On the CPU the trainer's side is checked with a stand-in that runs the step eagerly where a
graph would replay it: when it records, what it replays, what falls back to eager steps, and that the learning rate
reaches a recorded step through its tensor."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

import test_training
from rgt_fast.training import trainer
from rgt_fast.training.cuda_graph import (capture_problem, make_capturable, portable_optimizer_state,
                                          set_learning_rate)
from rgt_fast.training.trainer import EAGER_STEPS_BEFORE_CAPTURE, LearningRateSchedule
from test_training import log_text, train

smoke_dir = test_training.smoke_dir  # the fixture, shared

pytestmark = pytest.mark.usefixtures("single_thread")
ON_GPU = torch.cuda.is_available()


def adam(*, fused=None, lr=1e-2):
    net = torch.nn.Linear(4, 3)
    return net, torch.optim.Adam(net.parameters(), lr=lr, fused=fused)


def test_schedule_fills_a_tensor_learning_rate_in_place():
    _, optimizer = adam()
    make_capturable(optimizer)
    lr = optimizer.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and optimizer.param_groups[0]["capturable"]
    schedule = LearningRateSchedule(optimizer, {"type": "MultiStepLR", "milestones": [2], "gamma": 0.5,
                                                "restarts": [0], "restart_weights": [1.0]}, -1)
    assert schedule.base_lrs == [pytest.approx(1e-2)]
    schedule.apply(3)
    # The same tensor, which a recorded step reads, now holds the dropped rate.
    assert optimizer.param_groups[0]["lr"] is lr and lr.item() == pytest.approx(5e-3)
    set_learning_rate(optimizer.param_groups[0], 0.25)
    assert lr.item() == 0.25


def test_saved_state_has_plain_learning_rates_and_resumes_an_eager_optimizer():
    net, optimizer = adam()
    net(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    make_capturable(optimizer)
    set_learning_rate(optimizer.param_groups[0], 3e-3)
    state = portable_optimizer_state(optimizer)
    group = state["param_groups"][0]
    assert type(group["lr"]) is float and group["lr"] == pytest.approx(3e-3) and group["capturable"] is False
    # The optimizer itself keeps its tensor.
    assert isinstance(optimizer.param_groups[0]["lr"], torch.Tensor)
    net2, eager = adam()
    eager.load_state_dict(state)
    assert eager.param_groups[0]["lr"] == pytest.approx(3e-3)
    net2(torch.randn(2, 4)).sum().backward()
    eager.step()


def test_capture_problem_names_what_prevents_recording():
    _, plain = adam(fused=False)
    assert "CUDA device" in capture_problem(plain, torch.device("cpu"))
    assert "train.optim_g.fused: false" in capture_problem(plain, torch.device("cuda"))
    make_capturable(plain)
    assert capture_problem(plain, torch.device("cuda")) is None


class EagerReplay:
    """Stands in for CapturedStep on the CPU: "recording" runs nothing, and each call runs the step eagerly on the
    copied-in batch, as a replay would run the recorded one. Like CapturedStep it makes the optimizer capturable,
    except that PyTorch's capturable optimizers refuse CPU parameters: the learning rates become tensors, which the
    schedule must then fill for the replays to train like eager steps."""
    recorded: list[tuple] = []
    fail_with: str | None = None

    def __init__(self, body, optimizer, lq, gt):
        if EagerReplay.fail_with:
            raise RuntimeError(EagerReplay.fail_with)
        make_capturable(optimizer)
        for group in optimizer.param_groups:
            group["capturable"] = False
        self.body, self.optimizer = body, optimizer
        self.lq, self.gt = lq.clone(), gt.clone()
        EagerReplay.recorded.append((tuple(lq.shape), tuple(gt.shape)))

    def fits(self, lq, gt):
        return lq.shape == self.lq.shape and gt.shape == self.gt.shape

    def __call__(self, lq, gt):
        self.lq.copy_(lq)
        self.gt.copy_(gt)
        self.optimizer.zero_grad(set_to_none=True)
        return self.body(self.lq, self.gt)


@pytest.fixture
def eager_replay(monkeypatch):
    EagerReplay.recorded, EagerReplay.fail_with = [], None
    monkeypatch.setattr(trainer, "CapturedStep", EagerReplay)
    monkeypatch.setattr(trainer, "capture_problem", lambda optimizer, device: None)
    return EagerReplay


def final_weights(name: str) -> dict[str, torch.Tensor]:
    return torch.load(Path("experiments", name, "models", "net_g_latest.pth"), weights_only=True)["params"]


def test_trainer_records_after_its_eager_steps_and_replays_like_eager_training(smoke_dir, eager_replay):
    total = EAGER_STEPS_BEFORE_CAPTURE + 3
    assert train("name=eager", f"train.total_iter={total}", "train.cuda_graph=false") == 0
    assert eager_replay.recorded == []
    assert train("name=graph", f"train.total_iter={total}") == 0
    # One recording, at the first step after the eager ones; the milestone at 3 reaches the replays through the
    # learning-rate tensor, so the weights are those of eager training.
    assert eager_replay.recorded == [((2, 3, 16, 16), (2, 3, 32, 32))]
    assert "recorded the training step as a CUDA graph" in log_text("graph")
    expected, replayed = final_weights("eager"), final_weights("graph")
    for key, value in expected.items():
        assert torch.equal(value, replayed[key]), key


def test_a_step_that_cannot_be_recorded_trains_eagerly_with_a_warning(smoke_dir, eager_replay, caplog):
    eager_replay.fail_with = "operation not permitted when stream is capturing"
    total = EAGER_STEPS_BEFORE_CAPTURE + 2
    assert train("name=eager", f"train.total_iter={total}", "train.cuda_graph=false") == 0
    with caplog.at_level(logging.WARNING):
        assert train("name=fallback", f"train.total_iter={total}") == 0
    assert "could not record the training step as a CUDA graph (recording failed: operation not permitted" \
        in caplog.text
    expected, trained = final_weights("eager"), final_weights("fallback")
    for key, value in expected.items():
        assert torch.equal(value, trained[key]), key


@pytest.mark.parametrize("override", ["network_g.use_chk=true", "train.amp=fp16", "train.cuda_graph=false"])
def test_steps_that_cannot_or_should_not_be_recorded_run_eagerly(smoke_dir, eager_replay, override):
    """Gradient checkpointing saves and restores the CUDA random state, fp16's loss scaling reads the gradients on
    the CPU: neither may be recorded, whatever the device."""
    assert train("name=eager", f"train.total_iter={EAGER_STEPS_BEFORE_CAPTURE + 2}", override) == 0
    assert eager_replay.recorded == []


@pytest.mark.skipif(not ON_GPU, reason="recording a CUDA graph needs a GPU; the CPU tests above check the trainer's "
                                       "side with an eager stand-in")
def test_recorded_training_matches_eager_training_on_the_gpu(smoke_dir):
    total = EAGER_STEPS_BEFORE_CAPTURE + 4
    common = ("num_gpu=1", f"train.total_iter={total}", "network_g.drop_path_rate=0", "train.ema_decay=0")
    assert train("name=eager", *common, "train.cuda_graph=false") == 0
    assert train("name=graph", *common) == 0
    assert "recorded the training step as a CUDA graph" in log_text("graph")
    # cuDNN's timed algorithms and atomic reductions may differ in the last bits, which Adam turns into updates of
    # up to the learning rate for parameters without a clear gradient; a recorded step that kept the learning rate
    # from before the milestone at iteration 3, or skipped the update, would differ by a third of the updates or
    # more. So: the replayed run's updates since iteration 2 (both runs eager until 3) against the eager run's.
    start = torch.load(Path("experiments/eager/models/net_g_2.pth"), weights_only=True)["params"]
    expected, replayed = final_weights("eager"), final_weights("graph")
    keys = [key for key, value in start.items() if value.is_floating_point()]
    update = torch.cat([(expected[key] - start[key]).flatten().double() for key in keys])
    difference = torch.cat([(replayed[key] - expected[key]).flatten().double() for key in keys])
    assert update.norm() > 0
    assert difference.norm() < 0.05 * update.norm()

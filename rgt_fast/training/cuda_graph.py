"""A training step recorded once as a CUDA graph and replayed for every later batch of the same shape.

At BasicSR's training shapes (batch 8 to 32, 64x64 crops) RGT's step is bound by the CPU: an H200 spent 130 ms of
GPU time in a 600 ms step of the fused model, the rest issuing some ten thousand kernels and autograd nodes from
Python. Replaying the recorded step issues them all at once.

A graph replays the same kernels on the same memory, so the step's inputs are copied into tensors it owns, the
learning rate lives in a tensor that the schedule fills (``set_learning_rate``), and the optimizer must run its
update on the GPU without reading anything back (``capturable``). Drop-path masks stay random: PyTorch's CUDA
generator gives each replay fresh offsets.
"""
from __future__ import annotations

from typing import Callable

import torch

StepBody = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def capture_problem(optimizer: torch.optim.Optimizer, device: torch.device) -> str | None:
    """Why the step of ``optimizer`` on ``device`` cannot be recorded, or None when it can."""
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device, training runs on {device}"
    for group in optimizer.param_groups:
        if not group.get("fused") and not group.get("capturable"):
            return ("the optimizer is neither fused nor capturable (train.optim_g.fused: false); its step reads "
                    "its step counts on the CPU")
    return None


def make_capturable(optimizer: torch.optim.Optimizer) -> None:
    """Let ``optimizer.step()`` be recorded: capturable groups, and learning rates held in device tensors (a float
    would be baked into the recording). Run again after ``load_state_dict``, which restores the saved groups."""
    for group in optimizer.param_groups:
        device = group["params"][0].device
        group["capturable"] = True
        if not isinstance(group["lr"], torch.Tensor):
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)


def set_learning_rate(group: dict, value: float) -> None:
    """Set a param group's learning rate in place when it is a tensor, so that a recorded step reads the new one."""
    if isinstance(group["lr"], torch.Tensor):
        group["lr"].fill_(value)
    else:
        group["lr"] = value


def portable_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with plain-float learning rates and ``capturable`` as an eager run has it, so that
    a saved state loads anywhere (a CUDA lr tensor would not on a CPU machine) and resumes either way."""
    state = optimizer.state_dict()
    state["param_groups"] = [
        {**group, "lr": float(group["lr"]), "capturable": False}
        if isinstance(group["lr"], torch.Tensor) else group
        for group in state["param_groups"]]
    return state


class CapturedStep:
    """``body(lq, gt) -> loss`` (forward, loss, backward, optimizer step, with the gradients set to None before)
    recorded at construction, on tensors shaped as ``lq`` and ``gt``; calling it copies a batch in, replays, and
    returns the loss tensor, which the next call overwrites.

    Recording does not run the step: the first call does. It makes ``optimizer`` capturable
    (:func:`make_capturable`); the optimizer's state must exist before (one eager step), as must everything a first
    call compiles or tunes (Triton kernels, cuDNN algorithms)."""

    def __init__(self, body: StepBody, optimizer: torch.optim.Optimizer, lq: torch.Tensor, gt: torch.Tensor):
        self.lq, self.gt = lq.detach().clone(), gt.detach().clone()
        make_capturable(optimizer)
        optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        device = self.lq.device
        # Recording needs a stream other than the default one. torch.cuda.graph would leave that stream current if
        # the recording failed, so the stream is entered here, where it is left whatever happens.
        torch.cuda.synchronize(device)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            # thread_local: DataLoader's pin-memory thread may allocate pinned memory meanwhile, which "global"
            # would count as an error of this recording.
            self.graph.capture_begin(capture_error_mode="thread_local")
            try:
                self.loss = body(self.lq, self.gt)
            finally:
                self.graph.capture_end()
        torch.cuda.current_stream(device).wait_stream(stream)

    def fits(self, lq: torch.Tensor, gt: torch.Tensor) -> bool:
        return (lq.shape, lq.dtype, gt.shape, gt.dtype) == (self.lq.shape, self.lq.dtype, self.gt.shape,
                                                            self.gt.dtype)

    def __call__(self, lq: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        self.lq.copy_(lq, non_blocking=True)
        self.gt.copy_(gt, non_blocking=True)
        self.graph.replay()
        return self.loss

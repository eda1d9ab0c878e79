"""Training RGT from BasicSR option files: ``rgt-fast train -opt FILE.yml`` or ``python train/train.py -opt ...``.

One process trains on one device; ``--launcher pytorch`` under torchrun runs one process per GPU with
DistributedDataParallel. Runs resume exactly: a resumed run computes the same iterations as one that was never
interrupted (see ``checkpoints`` for what is saved and ``data`` for how batches are reproduced), bit for bit on the
CPU; on CUDA, cuDNN picks its convolution algorithms by timing them (as in BasicSR), so the last bits may differ.
A state written by BasicSR resumes at its iteration, learning rate and optimizer state, but with fresh data order
and random streams.
"""
from __future__ import annotations

import argparse
import bisect
import collections
import copy
import functools
import itertools
import logging
import math
import os
import secrets
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .. import create_model_from_kwargs
from ..checkpoint import CheckpointError, add_derived_buffers, describe_mismatch, read_state_dict
from .checkpoints import (ExperimentPaths, archive_existing, atomic_save, capture_rng, load_file, load_training_state,
                          net_file_of_state, restore_rng, resumes_exactly, seed_everything)
from .cuda_graph import CapturedStep, capture_problem, portable_optimizer_state, set_learning_rate
from .data import EvaluationPairs, build_training_loader
from .evaluate import build_metrics, evaluate_set
from .logs import attach_log_file, configure_console_logging, detach_log_file, hold_records_for_log_file
from .options import OptionError, load_train_options, network_kwargs, require_choice

logger = logging.getLogger(__name__)

OPTIMIZERS = {"Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW}
PIXEL_LOSSES = {"L1Loss": F.l1_loss, "MSELoss": F.mse_loss}
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Eager steps before the step is recorded as a CUDA graph: the first creates the optimizer's state, and the first
# ones compile the Triton kernels and time cuDNN's algorithms, none of which a recording may do.
EAGER_STEPS_BEFORE_CAPTURE = 3


class TrainingDiverged(RuntimeError):
    """The loss stopped being finite: the weights are lost, and going on would only spend the GPU's time."""


class ProcessSetup(NamedTuple):
    rank: int
    world_size: int
    device: torch.device
    owns_process_group: bool


def _single_process_device(num_gpu: Any) -> torch.device:
    if num_gpu == 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if num_gpu != "auto":
            logger.warning("num_gpu is %s but no CUDA device is available; training on the CPU", num_gpu)
        return torch.device("cpu")
    if num_gpu not in ("auto", 1):
        logger.warning("num_gpu %s without a launcher trains on one GPU; for several, run "
                       "torchrun --nproc_per_node %s train/train.py -opt FILE --launcher pytorch", num_gpu, num_gpu)
    return torch.device("cuda", torch.cuda.current_device())


def setup_processes(launcher: str, dist_params: Mapping[str, Any], num_gpu: Any) -> ProcessSetup:
    """This process's rank and device; with ``launcher="pytorch"``, joins torchrun's process group."""
    if launcher == "none":
        return ProcessSetup(0, 1, _single_process_device(num_gpu), False)
    require_choice(launcher, "--launcher", ["none", "pytorch"])
    missing = [name for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if name not in os.environ]
    if missing:
        raise OptionError(f"--launcher pytorch expects the environment torchrun sets ({', '.join(missing)} "
                           f"missing); start with: torchrun --nproc_per_node N train/train.py -opt FILE "
                           f"--launcher pytorch")
    local_rank = int(os.environ["LOCAL_RANK"])
    use_cuda = torch.cuda.is_available() and num_gpu != 0
    if use_cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    backend = dist_params["backend"] or ("nccl" if use_cuda else "gloo")
    if backend == "nccl" and not use_cuda:
        logger.warning("dist_params.backend is nccl but training runs on the CPU; using gloo")
        backend = "gloo"
    os.environ.setdefault("MASTER_PORT", str(dist_params["port"]))
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend)
    return ProcessSetup(dist.get_rank(), dist.get_world_size(), device, owns)


class LearningRateSchedule:
    """BasicSR's schedulers, after an optional linear warmup, as functions of the 1-based iteration.

    ``scheduler`` is the checked ``train.scheduler`` section. BasicSR steps its scheduler before every iteration but
    the first, so iteration k trains with the learning rate of scheduler step k - 1:

    - MultiStepLR / MultiStepRestartLR: from the last restart at or before the step, base_lr * its weight, times
      gamma for each milestone after that restart, up to the step (without a restart, from step 0 on). A
      milestone m drops the learning rate from iteration m + 1.
    - CosineAnnealingRestartLR: in the period i that the step falls in (a step at the end of a period is in it),
      starting at step c, eta_min + restart_weights[i] * (base_lr - eta_min) * (1 + cos(pi * (step - c) /
      periods[i])) / 2.

    Iterations below warmup_iter train with base_lr * k / warmup_iter. (BasicSR's multi-step scheduler, which
    multiplies the optimizer's current rate, then keeps the last warmup rate, (warmup_iter - 1) / warmup_iter of
    base_lr; here the schedule continues from base_lr.) The learning rate follows from the iteration alone, so a
    resumed run continues with exactly the learning rate it would have had.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler: Mapping[str, Any], warmup_iter: int):
        self.optimizer = optimizer
        self.base_lrs = [float(group["lr"]) for group in optimizer.param_groups]
        self.scheduler = dict(scheduler)
        self.warmup_iter = warmup_iter
        self._period_ends = list(itertools.accumulate(self.scheduler.get("periods", [])))

    def learning_rate(self, base_lr: float, iteration: int) -> float:
        if iteration < self.warmup_iter:
            return base_lr * iteration / self.warmup_iter
        step = iteration - 1
        if self.scheduler["type"] == "CosineAnnealingRestartLR":
            return self._cosine_annealing(base_lr, step)
        return self._multi_step(base_lr, step)

    def _multi_step(self, base_lr: float, step: int) -> float:
        restarts, milestones = self.scheduler["restarts"], self.scheduler["milestones"]
        past_restarts = [restart for restart in restarts if restart <= step]
        if past_restarts:
            restart = max(past_restarts)
            weight = self.scheduler["restart_weights"][restarts.index(restart)]
            drops = sum(restart < milestone <= step for milestone in milestones)
        else:
            weight, drops = 1.0, sum(milestone <= step for milestone in milestones)
        return base_lr * weight * self.scheduler["gamma"] ** drops

    def _cosine_annealing(self, base_lr: float, step: int) -> float:
        period = bisect.bisect_left(self._period_ends, step)
        start = self._period_ends[period - 1] if period else 0
        eta_min, weight = self.scheduler["eta_min"], self.scheduler["restart_weights"][period]
        progress = (step - start) / self.scheduler["periods"][period]
        return eta_min + weight * 0.5 * (base_lr - eta_min) * (1 + math.cos(math.pi * progress))

    def apply(self, iteration: int) -> None:
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            set_learning_rate(group, self.learning_rate(base_lr, iteration))

    def state_dict(self) -> dict[str, Any]:
        return {**self.scheduler, "warmup_iter": self.warmup_iter, "base_lrs": self.base_lrs}


def schedule_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """The settings of ``current`` that a saved schedule (this package's, or the state_dict of a BasicSR scheduler,
    which has other entries besides) records otherwise, as "key saved -> current"."""
    def comparable(key: str, value: Any) -> Any:
        # BasicSR keeps the milestones as a Counter.
        return sorted(collections.Counter(value).elements()) if key == "milestones" else value

    return [f"{key} {saved[key]} -> {value}" for key, value in current.items()
            if key in saved and comparable(key, saved[key]) != comparable(key, value)]


class GeneratorEMA:
    """Exponential moving average of the generator's parameters (BasicSR's ``net_g_ema``), kept in eval mode."""

    def __init__(self, net: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(net).eval().requires_grad_(False)
        self._parameters = list(self.model.parameters())

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        torch._foreach_lerp_(self._parameters, list(net.parameters()), 1.0 - self.decay)


def build_optimizer(net: nn.Module, spec: Mapping[str, Any]) -> torch.optim.Optimizer:
    """The optimizer of ``train.optim_g``. ``fused`` (PyTorch's option, which BasicSR passes through) defaults to
    True for parameters on CUDA: one kernel updates every parameter instead of a few launches per group of them,
    which is most of an Adam step's time for RGT's hundreds of small tensors. Elsewhere PyTorch chooses."""
    kind = require_choice(spec["type"], "train.optim_g.type", OPTIMIZERS)
    parameters = [p for p in net.parameters() if p.requires_grad]
    fused = spec["fused"]
    if fused is None and parameters and all(p.is_cuda for p in parameters):
        fused = True
    return OPTIMIZERS[kind](parameters, lr=spec["lr"], weight_decay=spec["weight_decay"], betas=tuple(spec["betas"]),
                            eps=spec["eps"], amsgrad=bool(spec["amsgrad"]),
                            fused=None if fused is None else bool(fused))


def build_pixel_loss(spec: Mapping[str, Any]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    kind = require_choice(spec["type"], "train.pixel_opt.type", PIXEL_LOSSES)
    reduction = require_choice(spec["reduction"], "train.pixel_opt.reduction", ["mean", "sum"])
    loss, weight = functools.partial(PIXEL_LOSSES[kind], reduction=reduction), float(spec["loss_weight"])
    return lambda sr, gt: weight * loss(sr, gt)


def _cpu_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().cpu() for key, value in module.state_dict().items()}


class Trainer:
    """A training run of the options returned by ``load_train_options``: ``Trainer(options).fit()``.

    ``net`` is the bare generator (what is saved), ``model`` what the step calls (DDP / compiled wrapper).
    """

    def __init__(self, options: dict[str, Any], *, auto_resume: bool = False, launcher: str = "none"):
        self.options = options
        self._log_file: logging.Handler | None = None
        self.tensorboard = None
        self.process = setup_processes(launcher, options["dist_params"], options["num_gpu"])
        try:
            with hold_records_for_log_file():  # the log file is opened once everything is built
                self._set_up(auto_resume)
        except BaseException as err:
            self.record_in_log_file("the run cannot start: %s", err)
            self.close()  # a run that cannot start must not leave its log file attached or its process group open
            raise

    def record_in_log_file(self, message: str, err: BaseException) -> None:
        """Write why the run stopped into its log file only: the console shows the error where the caller reports
        it."""
        if self._log_file is not None:
            self._log_file.handle(logger.makeRecord(logger.name, logging.ERROR, __file__, 0, message, (err,), None))

    # ----------------------------------------------------------------------------------------------- setup
    def _set_up(self, auto_resume: bool) -> None:
        options = self.options
        self.is_main = self.process.rank == 0
        self.device = self.process.device
        train_options, logger_options = options["train"], options["logger"]
        for dotted, value in (("train.total_iter", train_options["total_iter"]),
                              ("logger.print_freq", logger_options["print_freq"]),
                              ("logger.save_checkpoint_freq", logger_options["save_checkpoint_freq"]),
                              ("val.val_freq", (options["val"] or {}).get("val_freq", 1))):
            if value < 1:
                raise OptionError(f"option {dotted} must be at least 1, got {value}")
        self.paths = ExperimentPaths(Path(options["path"]["experiments_root"] or Path("experiments") / options["name"]))
        state_path, state = self._state_to_resume(auto_resume)
        if self.is_main:
            logger.info("options:\n%s", yaml.safe_dump(options, sort_keys=False).rstrip())

        if self.device.type == "cuda":
            # As BasicSR's train.py: training patches have one size, so the fastest algorithms are timed once.
            torch.backends.cudnn.benchmark = True
        self.seed = self._choose_seed(state)
        # Each rank draws its own drop-path masks; DDP gives every rank rank 0's initial weights.
        seed_everything(self.seed + self.process.rank)
        self.net = self._build_network()
        pretrained = options["path"]["pretrain_network_g"] if state is None else None
        if pretrained:
            self._load_pretrained(self.net, "net_g", pretrained, options["path"]["param_key_g"])
        self.model: nn.Module = self.net
        if self.process.world_size > 1:
            self.model = DistributedDataParallel(
                self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                gradient_as_bucket_view=True)
            # RGT's buffers (position indices, shift masks) never change: nothing to broadcast before each step.
            # Set after construction: the constructor argument for this is renamed across torch versions.
            self.model.broadcast_buffers = False
        if train_options["compile"]:
            self.model = torch.compile(self.model)
        self.ema = GeneratorEMA(self.net, train_options["ema_decay"]) if train_options["ema_decay"] > 0 else None
        if self.ema is not None and pretrained:
            # As BasicSR: the EMA starts from the file's EMA weights (its 'params' when it has none).
            self._load_pretrained(self.ema.model, "net_g_ema", pretrained, "params_ema")
        self.optimizer = build_optimizer(self.net, train_options["optim_g"])
        self.schedule = LearningRateSchedule(self.optimizer, train_options["scheduler"], train_options["warmup_iter"])
        self.pixel_loss = build_pixel_loss(train_options["pixel_opt"])
        self.amp_dtype = AMP_DTYPES[require_choice(train_options["amp"], "train.amp", AMP_DTYPES)]
        self.grad_scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype is torch.float16 else None
        self.graph_problem = self._graph_problem(train_options["cuda_graph"])
        self.captured: CapturedStep | None = None
        self._eager_steps = 0

        train_set = options["datasets"]["train"]
        self.batch_size = train_set["batch_size_per_gpu"]
        self.loader, self.sampler = build_training_loader(
            train_set, options["scale"], self.seed, num_replicas=self.process.world_size, rank=self.process.rank,
            pin_memory=self.device.type == "cuda")
        self.val_sets, self.metrics = self._validation_setup()
        if self.is_main:
            # Only now, when everything the options name has been built: a run that cannot start leaves the previous
            # experiment where it was.
            archived = archive_existing(self.paths.root) if state is None else None
            self.paths.create()
            self._log_file = attach_log_file(
                self.paths.root / f"train_{options['name']}_{time.strftime('%Y%m%d_%H%M%S')}.log")
            if archived is not None:
                logger.info("moved the previous experiment %s to %s", self.paths.root, archived)

        self.iteration = self.epoch = self.samples_into_epoch = 0
        self.best: dict[str, dict[str, dict[str, float]]] = {}
        self._saved_at: int | None = None
        self._validated_at: int | None = None
        # Since the last log line, on the device (reading them each step would wait for the GPU): the sum of the
        # finite losses and the count of steps whose loss was not finite.
        self._loss_sum = torch.zeros((), device=self.device)
        self._nonfinite_losses = torch.zeros((), device=self.device)
        self._loss_count = 0
        self.tensorboard = self._open_tensorboard()
        if state is not None:
            self._resume(state, state_path)

    def _graph_problem(self, wanted: bool) -> str | None:
        """Why the training step runs eagerly instead of as a CUDA graph (None when it will be recorded)."""
        if not wanted:
            return "train.cuda_graph is false"
        known_problems = (
            (self.process.world_size > 1, "DistributedDataParallel's gradient all-reduce is not recorded"),
            (self.grad_scaler is not None,
             "fp16's loss scaling reads the gradients' finiteness on the CPU; train.amp: bf16 needs none"),
            (self.options["train"]["compile"],
             "train.compile is on (torch.compile(mode='reduce-overhead') records graphs itself)"),
            (self.options["network_g"].get("use_chk"),
             "network_g.use_chk: gradient checkpointing saves and restores the CUDA random state around each "
             "block, which a recording cannot"),
        )
        problem = capture_problem(self.optimizer, self.device) or next(
            (reason for applies, reason in known_problems if applies), None)
        if problem is not None and self.device.type == "cuda":
            logger.info("the training step runs eagerly, not as a CUDA graph: %s", problem)
        return problem

    def _state_to_resume(self, auto_resume: bool) -> tuple[Path | None, dict[str, Any] | None]:
        if auto_resume:
            states = self.paths.states_newest_first()
            for path in states:
                try:
                    state = load_training_state(path)
                except CheckpointError as err:
                    logger.warning("auto_resume: %s; trying the state before it", err)
                    continue
                net_file = net_file_of_state(path, int(state["iter"]))
                if net_file.is_file():
                    return path, state
                logger.warning("auto_resume: %s belongs with %s, which does not exist; trying the state before it",
                               path, net_file)
            if states:
                raise CheckpointError(f"auto_resume: none of the {len(states)} training state(s) in "
                                      f"{self.paths.training_states} can be read (see the warnings); set "
                                      f"path.resume_state to another state, or remove them to start afresh")
            logger.info("auto_resume: no training state in %s; starting from scratch", self.paths.training_states)
        explicit = self.options["path"]["resume_state"]
        return (Path(explicit), load_training_state(Path(explicit))) if explicit else (None, None)

    def _choose_seed(self, state: Mapping[str, Any] | None) -> int:
        # A resumed run keeps its seed: the data order of the interrupted epoch depends on it.
        if state is not None and resumes_exactly(state):
            return int(state["seed"])
        seed = self.options["manual_seed"]
        if seed is None:
            chosen = [secrets.randbelow(10_000) + 1]
            if self.process.world_size > 1:
                dist.broadcast_object_list(chosen, src=0)
            seed = chosen[0]
            logger.info("manual_seed is not set; using seed %d", seed)
        return seed

    def _build_network(self) -> nn.Module:
        network = self.options["network_g"]
        kwargs = network_kwargs(network)
        scale = self.options["scale"]
        kwargs.setdefault("upscale", scale)
        if kwargs["upscale"] != scale:
            raise OptionError(f"network_g.upscale {kwargs['upscale']} differs from scale {scale}")
        net = create_model_from_kwargs(kwargs, fused=bool(network["fast"]))
        logger.info("network: %s RGT, %s parameters", "fused" if network["fast"] else "reference",
                    f"{sum(p.numel() for p in net.parameters()):,}")
        return net.to(self.device)

    def _load_pretrained(self, net: nn.Module, name: str, path: str, param_key: str) -> None:
        # Exported weights (train/export_weights.py, the demo models) leave out the buffers the architecture fixes.
        weights = add_derived_buffers(net, read_state_dict(path, param_key=param_key))
        if self.options["path"]["strict_load_g"]:
            problems = describe_mismatch(net, weights)
            if problems:
                raise CheckpointError(f"{path}: does not fit network_g ({problems}); set path.strict_load_g: "
                                      f"false to load only the matching weights")
            net.load_state_dict(weights)
        else:
            # As BasicSR: weights whose shape differs (another scale's upsampler) are skipped, not an error.
            expected = net.state_dict()
            resized = sorted(k for k, v in weights.items() if k in expected and v.shape != expected[k].shape)
            result = net.load_state_dict({k: v for k, v in weights.items() if k not in resized}, strict=False)
            for label, keys in (("different shape", resized), ("missing", result.missing_keys),
                                ("unexpected", result.unexpected_keys)):
                if keys:
                    logger.warning("%s: %d weight(s) not loaded into %s (%s): %s", path, len(keys), name, label,
                                   ", ".join(keys))
        logger.info("loaded %s from %s (param key %s)", name, path, param_key)

    def _validation_setup(self) -> tuple[list[EvaluationPairs], dict[str, Callable]]:
        val = self.options["val"]
        datasets = self.options["datasets"]
        keys = sorted(key for key in datasets if key.startswith("val"))
        if val is None or not self.is_main:
            return [], {}
        if not keys:
            logger.warning("val is set but datasets has no val entry; training without validation")
        sets = [EvaluationPairs.from_options(datasets[key], self.options["scale"], f"datasets.{key}") for key in keys]
        return sets, build_metrics(val["metrics"])

    def _open_tensorboard(self):
        logger_options = self.options["logger"]
        if logger_options["wandb"]["project"] and self.is_main:
            logger.warning("logger.wandb is not supported by rgt-fast; ignoring it")
        if not (logger_options["use_tb_logger"] and self.is_main):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            logger.warning("use_tb_logger is on but TensorBoard is not installed (pip install tensorboard); "
                           "logging to the log file only")
            return None
        return SummaryWriter(log_dir=str(self.paths.root / "tb_logger"))

    def _resume(self, state: Mapping[str, Any], state_path: Path) -> None:
        iteration = int(state["iter"])
        net_file = net_file_of_state(state_path, iteration)
        if not net_file.is_file():
            raise FileNotFoundError(f"{state_path} belongs with {net_file}, which does not exist")
        weights = load_file(net_file)
        problems = describe_mismatch(self.net, weights["params"])
        if problems:
            raise CheckpointError(f"{net_file}: does not fit network_g ({problems}); network_g differs from the run "
                                  f"being resumed: restore its options, or start afresh without resuming")
        self.net.load_state_dict(weights["params"])
        if self.ema is not None:
            if "params_ema" not in weights:
                logger.warning("%s has no params_ema; the EMA restarts from the current weights", net_file)
            self.ema.model.load_state_dict(weights.get("params_ema", weights["params"]))
        elif "ema" in state:
            logger.warning("the run being resumed kept an EMA; train.ema_decay is now 0, so it is dropped")
        self.optimizer.load_state_dict(state["optimizers"][0])
        changes = schedule_differences(state["schedulers"][0], self.schedule.state_dict())
        if changes:
            logger.warning("the option file's learning-rate schedule differs from the saved run's (%s); following "
                           "the option file", ", ".join(changes))
        if self.grad_scaler is not None and state.get("grad_scaler"):
            self.grad_scaler.load_state_dict(state["grad_scaler"])
        self.iteration = self._saved_at = iteration
        if resumes_exactly(state):
            self.epoch, self.samples_into_epoch = int(state["epoch"]), int(state["samples_into_epoch"])
            self.best = state["best_metrics"]
            rng_states = state["rng"]
            if self.process.rank < len(rng_states):
                # Last: everything built above (network initialisation included) has drawn from the generators.
                restore_rng(rng_states[self.process.rank])
            else:
                logger.warning("the saved run had %d process(es); rank %d starts from a fresh random state",
                               len(rng_states), self.process.rank)
        else:
            # Where BasicSR's run stood in its epoch and in its random streams is not saved: start the next epoch.
            self.epoch, self.samples_into_epoch = int(state["epoch"]) + 1, 0
            logger.warning("%s holds no data position or random state (a BasicSR state): resuming at iteration %d "
                           "with its weights, optimizer and learning rate, but from the start of epoch %d, with "
                           "random streams from seed %d and no best metrics, so the run will not match an "
                           "uninterrupted one", state_path, iteration, self.epoch, self.seed)
        logger.info("resuming from iteration %d (epoch %d) of %s", iteration, self.epoch, state_path)

    # -------------------------------------------------------------------------------------------- training
    def fit(self) -> None:
        total = self.options["train"]["total_iter"]
        logger.info("training %s: iterations %d to %d, %d process(es) on %s, batch %d per process",
                    self.options["name"], self.iteration + 1, total, self.process.world_size, self.device,
                    self.batch_size)
        self._last_log = (self.iteration, time.perf_counter())
        self.net.train()
        while self.iteration < total:
            self.sampler.set_epoch(self.epoch, skip=self.samples_into_epoch)
            for batch in self.loader:
                self.iteration += 1
                self.samples_into_epoch += self.batch_size
                self._train_step(batch)
                self._after_step()
                if self.iteration >= total:
                    break
            else:
                self.epoch += 1
                self.samples_into_epoch = 0
        if self._saved_at != self.iteration:
            self.save_checkpoint()
        if self.val_sets and self._validated_at != self.iteration:
            self.validate()
        logger.info("training done at iteration %d", self.iteration)

    def _train_step(self, batch: Mapping[str, torch.Tensor]) -> None:
        lq = batch["lq"].to(self.device, non_blocking=True)
        gt = batch["gt"].to(self.device, non_blocking=True)
        self.schedule.apply(self.iteration)
        if self.captured is not None and self.captured.fits(lq, gt):
            loss = self.captured(lq, gt)
        elif (self.graph_problem is None and self.captured is None
              and self._eager_steps >= EAGER_STEPS_BEFORE_CAPTURE):
            loss = self._capture_and_step(lq, gt)
        else:
            loss = self._eager_step(lq, gt)
        if self.ema is not None:
            self.ema.update(self.net)
        finite = torch.isfinite(loss)
        self._loss_sum += torch.where(finite, loss, 0.0)
        self._nonfinite_losses += ~finite
        self._loss_count += 1

    def _loss(self, lq: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        # The autocast cache of casted weights would outlive a recording; each weight is cast once per step anyway.
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None,
                            cache_enabled=False):
            sr = self.model(lq)
        return self.pixel_loss(sr.float(), gt)

    def _forward_backward_update(self, lq: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        """The step after the gradients are cleared, eager or recorded: the loss, detached."""
        loss = self._loss(lq, gt)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def _eager_step(self, lq: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        self._eager_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        if self.grad_scaler is None:
            return self._forward_backward_update(lq, gt)
        loss = self._loss(lq, gt)
        self.grad_scaler.scale(loss).backward()
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()
        return loss.detach()

    def _capture_and_step(self, lq: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        try:
            self.captured = CapturedStep(self._forward_backward_update, self.optimizer, lq, gt)
        except RuntimeError as err:
            # Recording runs nothing: the weights and the optimizer's state are as before, and the step runs eagerly.
            self.graph_problem = f"recording failed: {str(err).splitlines()[0][:300]}"
            logger.warning("could not record the training step as a CUDA graph (%s); training eagerly",
                           self.graph_problem)
            return self._eager_step(lq, gt)
        logger.info("recorded the training step as a CUDA graph (lq %s, gt %s); later batches of that shape replay it",
                    tuple(lq.shape), tuple(gt.shape))
        return self.captured(lq, gt)

    def _after_step(self) -> None:
        logger_options, val = self.options["logger"], self.options["val"]
        if self.iteration % logger_options["print_freq"] == 0:
            self._log_progress()
        if self.iteration % logger_options["save_checkpoint_freq"] == 0:
            self.save_checkpoint()
        if self.val_sets and self.iteration % val["val_freq"] == 0:
            self.validate()

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _losses_since_last_log(self) -> tuple[float, int, int]:
        """(sum of the finite losses, steps with a non-finite loss, steps) over every process since the last log;
        raises TrainingDiverged where the weights can no longer be finite."""
        totals = torch.stack((self._loss_sum, self._nonfinite_losses))
        if self.process.world_size > 1:
            dist.all_reduce(totals)
        loss_sum, nonfinite = totals.tolist()
        nonfinite, steps = int(nonfinite), self._loss_count * self.process.world_size
        # Without fp16 loss scaling, a non-finite loss has made the gradients, and through Adam the weights,
        # non-finite. With it, the scaler skips such steps' updates and the weights stay finite: only an interval
        # without one finite loss means that the run no longer learns.
        if nonfinite and (self.grad_scaler is None or nonfinite == steps):
            fp16_hint = ("" if self.grad_scaler is None
                         else " or train.amp: bf16 (fp16 overflows where bf16 does not)")
            raise TrainingDiverged(
                f"training diverged: the loss was not finite in {nonfinite} of the {steps} steps up to iteration "
                f"{self.iteration}. Nothing after iteration {self._saved_at or 0} is saved; lower "
                f"train.optim_g.lr or raise train.warmup_iter{fp16_hint}, then resume from the last training state "
                f"with --auto_resume")
        return loss_sum, nonfinite, steps

    def _log_progress(self) -> None:
        loss_sum, nonfinite, steps = self._losses_since_last_log()
        now = time.perf_counter()
        speed = (self.iteration - self._last_log[0]) / max(now - self._last_log[1], 1e-9)
        self._last_log = (self.iteration, now)
        self._loss_sum.zero_()
        self._nonfinite_losses.zero_()
        self._loss_count = 0
        if not self.is_main:
            return
        if nonfinite:
            logger.warning("%d of the last %d steps had a non-finite loss; fp16 loss scaling skipped their updates",
                           nonfinite, steps)
        total = self.options["train"]["total_iter"]
        eta = timedelta(seconds=round((total - self.iteration) / speed))
        loss_value = loss_sum / (steps - nonfinite)
        logger.info("[%s] epoch %d, iter %d/%d, lr %.3e, l_pix %.4e, %.2f it/s, eta %s", self.options["name"],
                    self.epoch, self.iteration, total, self.current_lr(), loss_value, speed, eta)
        if self.tensorboard is not None:
            self.tensorboard.add_scalar("losses/l_pix", loss_value, self.iteration)
            self.tensorboard.add_scalar("lr", self.current_lr(), self.iteration)

    def save_checkpoint(self) -> None:
        """Weights and training state of the current iteration (rank 0 writes; every rank gives its RNG); never
        weights that a non-finite loss has spoilt."""
        self._losses_since_last_log()
        rng = [capture_rng()]
        if self.process.world_size > 1:
            rng = [None] * self.process.world_size
            dist.all_gather_object(rng, capture_rng())
        self._saved_at = self.iteration
        if not self.is_main:
            return
        weights = {"params": _cpu_state_dict(self.net)}
        if self.ema is not None:
            weights["params_ema"] = _cpu_state_dict(self.ema.model)
        # Weights first: a state file on disk always has its weights beside it.
        atomic_save(weights, self.paths.net_file(self.iteration))
        atomic_save(weights, self.paths.net_file("latest"))
        state = {"iter": self.iteration, "epoch": self.epoch, "samples_into_epoch": self.samples_into_epoch,
                 "seed": self.seed, "optimizers": [portable_optimizer_state(self.optimizer)],
                 "schedulers": [self.schedule.state_dict()], "rng": rng, "best_metrics": self.best}
        if self.ema is not None:
            state["ema"] = {"decay": self.ema.decay}
        if self.grad_scaler is not None:
            state["grad_scaler"] = self.grad_scaler.state_dict()
        atomic_save(state, self.paths.state_file(self.iteration))
        logger.info("saved %s and %s", self.paths.net_file(self.iteration), self.paths.state_file(self.iteration))

    def validate(self) -> None:
        """PSNR/SSIM on every val set with the EMA weights when kept (as BasicSR), logged with the best so far."""
        self._validated_at = self.iteration
        model = self.ema.model if self.ema is not None else self.net
        save_img = self.options["val"]["save_img"]
        for pairs in self.val_sets:
            save_dir = self.paths.visualization / pairs.name if save_img else None
            scores = evaluate_set(model, pairs, self.metrics, save_dir=save_dir, image_suffix=str(self.iteration))
            best = self.best.setdefault(pairs.name, {})
            parts = []
            for metric, value in scores.averages().items():
                if value == value and (metric not in best or value > best[metric]["value"]):
                    best[metric] = {"value": value, "iter": self.iteration}
                record = best.get(metric)
                parts.append(f"{metric} {value:.4f}" + (f" (best {record['value']:.4f} @ iter {record['iter']})"
                                                        if record else ""))
                if self.tensorboard is not None:
                    self.tensorboard.add_scalar(f"metrics/{pairs.name}/{metric}", value, self.iteration)
            logger.info("validation %s at iter %d: %s", pairs.name, self.iteration, ", ".join(parts))
        self.net.train()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self._log_file is not None:
            detach_log_file(self._log_file)
            self._log_file = None
        if self.process.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-opt", required=True, metavar="FILE", help="BasicSR training option file (YAML)")
    parser.add_argument("--auto_resume", action="store_true",
                        help="continue from the latest state in experiments/<name>/training_states")
    parser.add_argument("--launcher", choices=["none", "pytorch"], default="none",
                        help="pytorch: one process per GPU under torchrun, DistributedDataParallel")
    parser.add_argument("--force_yml", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override options, e.g. train.total_iter=1000 (value parsed as YAML)")
    # torch.distributed.launch (the authors' README) passes the local rank as an argument; LOCAL_RANK is used.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)


def run_training(args: argparse.Namespace) -> int:
    """``rgt-fast train``: train until ``train.total_iter``; 0 on success, 1 when training diverged."""
    configure_console_logging(int(os.environ.get("RANK", 0)) if args.launcher == "pytorch" else 0)
    with hold_records_for_log_file():
        options = load_train_options(args.opt, args.force_yml)
        trainer = Trainer(options, auto_resume=args.auto_resume, launcher=args.launcher)
    try:
        trainer.fit()
    except TrainingDiverged as err:
        logger.error("%s", err)  # into the run's log file too
        return 1
    except BaseException as err:
        trainer.record_in_log_file("training stopped: %s", err)
        raise
    finally:
        trainer.close()
    return 0

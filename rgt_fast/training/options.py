"""BasicSR option files for training and testing RGT: reading, checking and command-line overrides.

The files are BasicSR's YAML; the authors' ``options/train/*.yml`` and ``options/test/*.yml`` load unchanged.
Every key this package reads is declared below with its default. A missing required key is an error naming its
dotted path; keys nothing reads are reported in one warning, so a typo such as ``use_hfilp`` cannot pass
unnoticed while BasicSR-only extras (``pbar``, ``find_unused_parameters``...) stay harmless.
"""
from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from ..reference import RGT as ReferenceRGT
from ..reference.rgt import MIN_TRAINING_SIZE

logger = logging.getLogger(__name__)

REQUIRED = object()


class OptionError(ValueError):
    """An option file that cannot be used; the message names the option by its dotted path."""


@dataclass(frozen=True)
class Section:
    """A mapping of known keys (each a default, ``REQUIRED`` or a nested Section).

    ``optional`` sections that are absent read as None; others are filled with their defaults. Keys that start
    with ``each_prefix`` and are not listed follow the ``each`` schema (dataset phases, metric names). A section
    with ``variants`` follows the one its ``type`` names (scheduler types, each with its own keys).
    """

    fields: Mapping[str, Any] = field(default_factory=dict)
    optional: bool = False
    each: "Section | None" = None
    each_prefix: str = ""
    variants: "Mapping[str, Section] | None" = None

    def has_required(self) -> bool:
        return self.variants is not None or any(
            value is REQUIRED or (isinstance(value, Section) and not value.optional and value.has_required())
            for value in self.fields.values())


# Constructor arguments of RGT; None leaves the constructor's default, as BasicSR passes only the keys given.
NETWORK_ARGUMENTS = tuple(name for name, parameter in inspect.signature(ReferenceRGT.__init__).parameters.items()
                          if name != "self" and parameter.kind is parameter.POSITIONAL_OR_KEYWORD)

_NETWORK = Section({"type": REQUIRED, "fast": True, **{name: None for name in NETWORK_ARGUMENTS}})
_IO_BACKEND = Section({"type": "disk"})
_METRIC = Section({"type": REQUIRED, "crop_border": REQUIRED, "test_y_channel": False})
# ``task`` appears in the authors' dataset entries; nothing reads it.
_EVAL_DATASET = Section({"task": None, "name": REQUIRED, "type": REQUIRED, "dataroot_gt": REQUIRED,
                         "dataroot_lq": None, "filename_tmpl": "{}", "io_backend": _IO_BACKEND})
# A test set can be LQ images alone (SingleImageDataset), so which roots it needs depends on its type; data.py
# checks them.
_TEST_DATASET = Section({**_EVAL_DATASET.fields, "dataroot_gt": None})
_TRAIN_DATASET = Section({
    **_EVAL_DATASET.fields, "gt_size": REQUIRED, "use_hflip": False, "use_rot": False, "use_shuffle": True,
    "num_worker_per_gpu": REQUIRED, "batch_size_per_gpu": REQUIRED, "dataset_enlarge_ratio": 1,
    # BasicSR's prefetchers; pinned memory and non-blocking copies play their part here.
    "prefetch_mode": None,
})
_MULTI_STEP = Section({"type": REQUIRED, "milestones": REQUIRED, "gamma": 0.1, "restarts": [0],
                       "restart_weights": [1]})
_SCHEDULER = Section(variants={
    # BasicSR runs MultiStepLR as MultiStepRestartLR, whose default restart (weight 1 at step 0) changes nothing.
    "MultiStepLR": _MULTI_STEP,
    "MultiStepRestartLR": _MULTI_STEP,
    "CosineAnnealingRestartLR": Section({"type": REQUIRED, "periods": REQUIRED, "restart_weights": [1],
                                         "eta_min": 0.0}),
})
_GENERAL = {"name": REQUIRED, "model_type": "RGTModel", "scale": REQUIRED, "num_gpu": "auto", "manual_seed": None}

TRAIN_SCHEMA = Section({
    **_GENERAL,
    "datasets": Section({"train": _TRAIN_DATASET}, each=_EVAL_DATASET, each_prefix="val"),
    "network_g": _NETWORK,
    "path": Section({"pretrain_network_g": None, "param_key_g": "params", "strict_load_g": True,
                     "resume_state": None, "experiments_root": None}),
    "train": Section({
        "optim_g": Section({"type": REQUIRED, "lr": REQUIRED, "weight_decay": 0.0, "betas": [0.9, 0.999],
                            "eps": 1e-8, "amsgrad": False, "fused": None}),
        "scheduler": _SCHEDULER,
        "total_iter": REQUIRED,
        "warmup_iter": -1,
        "pixel_opt": Section({"type": REQUIRED, "loss_weight": 1.0, "reduction": "mean"}),
        "ema_decay": 0.0,
        "amp": "none",
        "compile": False,
        "cuda_graph": True,
    }),
    "val": Section({"val_freq": REQUIRED, "save_img": False, "metrics": Section(each=_METRIC)}, optional=True),
    "logger": Section({"print_freq": 100, "save_checkpoint_freq": 5000, "use_tb_logger": False,
                       "wandb": Section({"project": None, "resume_id": None})}),
    "dist_params": Section({"backend": None, "port": 29500}),
})

TEST_SCHEMA = Section({
    **_GENERAL,
    "datasets": Section(each=_TEST_DATASET),
    "network_g": _NETWORK,
    "path": Section({"pretrain_network_g": REQUIRED, "param_key_g": "params", "strict_load_g": True}),
    "val": Section({"save_img": False, "suffix": None, "use_chop": False, "metrics": Section(each=_METRIC)}),
})


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _check(schema: Section, values: Any, path: str, unknown: list[str]) -> dict[str, Any]:
    if not isinstance(values, Mapping):
        raise OptionError(f"option {path or '(top level)'} must be a mapping, got {values!r}")
    if schema.variants is not None:
        kind = values.get("type")
        if kind is None:
            raise OptionError(f"missing required option {_join(path, 'type')}")
        schema = schema.variants[require_choice(kind, _join(path, "type"), schema.variants)]
    checked: dict[str, Any] = {}
    for key, spec in schema.fields.items():
        dotted = _join(path, key)
        value = values.get(key)
        if isinstance(spec, Section):
            if value is None:
                if spec.optional:
                    checked[key] = None
                    continue
                if spec.has_required():
                    raise OptionError(f"missing required option {dotted}")
                value = {}
            checked[key] = _check(spec, value, dotted, unknown)
        elif value is None:
            if spec is REQUIRED:
                raise OptionError(f"missing required option {dotted}")
            checked[key] = copy.deepcopy(spec)
        else:
            checked[key] = value
    for key, value in values.items():
        if key in schema.fields:
            continue
        if schema.each is not None and str(key).startswith(schema.each_prefix):
            checked[key] = _check(schema.each, value, _join(path, key), unknown)
        else:
            unknown.append(_join(path, key))
    return checked


def _number(value: Any, dotted: str, kind: type) -> Any:
    # PyYAML reads 2e-4 (no dot) as a string, which is why BasicSR files write !!float; accept both spellings.
    try:
        number = float(value) if isinstance(value, str) else value
    except ValueError:
        number = value
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        raise OptionError(f"option {dotted} must be a number, got {value!r}")
    if kind is int:
        if float(number) != int(number):
            raise OptionError(f"option {dotted} must be a whole number, got {value!r}")
        return int(number)
    return float(number)


def _convert(options: dict[str, Any], conversions: Iterable[tuple[str, type]]) -> None:
    for dotted, kind in conversions:
        *parents, key = dotted.split(".")
        section = options
        for parent in parents:
            section = section.get(parent) if section else None
        if section is None or section.get(key) is None:
            continue
        value = section[key]
        if isinstance(value, list):
            section[key] = [_number(item, dotted, kind) for item in value]
        else:
            section[key] = _number(value, dotted, kind)


_TRAIN_NUMBERS = (
    ("scale", int), ("manual_seed", int),
    ("datasets.train.gt_size", int), ("datasets.train.num_worker_per_gpu", int),
    ("datasets.train.batch_size_per_gpu", int), ("datasets.train.dataset_enlarge_ratio", int),
    ("train.optim_g.lr", float), ("train.optim_g.weight_decay", float), ("train.optim_g.betas", float),
    ("train.optim_g.eps", float), ("train.scheduler.milestones", int), ("train.scheduler.gamma", float),
    ("train.scheduler.restarts", int), ("train.scheduler.restart_weights", float), ("train.scheduler.periods", int),
    ("train.scheduler.eta_min", float),
    ("train.total_iter", int), ("train.warmup_iter", int), ("train.pixel_opt.loss_weight", float),
    ("train.ema_decay", float), ("val.val_freq", int), ("logger.print_freq", int),
    ("logger.save_checkpoint_freq", int),
)


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> None:
    """Set ``a.b.c=value`` entries (value parsed as YAML) in ``raw``, creating sections as needed.

    BasicSR spells the path with colons (``train:ema_decay=0.999``); both separators are accepted.
    """
    for entry in overrides:
        keys, separator, text = entry.partition("=")
        path = [key.strip() for key in keys.replace(":", ".").split(".")]
        if not separator or not all(path):
            raise OptionError(f"--force_yml expects key.path=value, got {entry!r}")
        section = raw
        for depth, key in enumerate(path[:-1]):
            child = section.get(key)
            if child is None:
                child = section[key] = {}
            elif not isinstance(child, dict):
                raise OptionError(f"--force_yml {keys}: {'.'.join(path[:depth + 1])} is {child!r}, not a section")
            section = child
        try:
            section[path[-1]] = yaml.safe_load(text)
        except yaml.YAMLError:
            # As BasicSR's --force_yml: what does not parse is a string ({}_x2, a filename_tmpl).
            section[path[-1]] = text


def read_option_file(path: str | Path, overrides: Iterable[str] = ()) -> dict[str, Any]:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise OptionError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise OptionError(f"{path}: expected a mapping of options, got {type(raw).__name__}")
    apply_overrides(raw, overrides)
    return raw


def check_options(raw: Mapping[str, Any], schema: Section, origin: str) -> dict[str, Any]:
    """``raw`` checked against ``schema``, with defaults filled in; unknown keys are logged in one warning."""
    unknown: list[str] = []
    options = _check(schema, raw, "", unknown)
    if unknown:
        logger.warning("%s: ignoring unknown option(s): %s", origin, ", ".join(unknown))
    return options


def _check_scheduler(train: Mapping[str, Any]) -> None:
    """What BasicSR's schedulers assert, said before training starts rather than at the iteration it fails."""
    scheduler = train["scheduler"]
    for key in ("milestones", "restarts", "restart_weights", "periods"):
        if key in scheduler and not isinstance(scheduler[key], list):
            raise OptionError(f"option train.scheduler.{key} must be a list, e.g. [{scheduler[key]}], got "
                              f"{scheduler[key]!r}")
    weights = scheduler["restart_weights"]
    if scheduler["type"] != "CosineAnnealingRestartLR":
        if len(scheduler["restarts"]) != len(weights):
            raise OptionError(f"option train.scheduler.restart_weights gives {len(weights)} weight(s) for "
                              f"{len(scheduler['restarts'])} restart(s); give one per restart")
        return
    periods = scheduler["periods"]
    if len(periods) != len(weights):
        raise OptionError(f"option train.scheduler.restart_weights gives {len(weights)} weight(s) for "
                          f"{len(periods)} period(s); give one per period")
    if not periods or min(periods) < 1:
        raise OptionError(f"option train.scheduler.periods must list periods of at least 1 iteration, got {periods}")
    # Iteration k trains at scheduler step k - 1, and the schedule ends with the step sum(periods).
    if sum(periods) + 1 < train["total_iter"]:
        raise OptionError(f"option train.scheduler.periods end at iteration {sum(periods) + 1}, before "
                          f"train.total_iter {train['total_iter']}; lengthen the periods or add one")


def _check_ranges(options: Mapping[str, Any]) -> None:
    """Values that would otherwise fail deep inside PyTorch or the model, or train silently wrong."""
    train_set, train, scale = options["datasets"]["train"], options["train"], options["scale"]
    if train_set["batch_size_per_gpu"] < 1:
        raise OptionError(f"option datasets.train.batch_size_per_gpu must be at least 1, got "
                          f"{train_set['batch_size_per_gpu']}")
    if train_set["num_worker_per_gpu"] < 0:
        raise OptionError(f"option datasets.train.num_worker_per_gpu must be at least 0, got "
                          f"{train_set['num_worker_per_gpu']}")
    smallest_gt = MIN_TRAINING_SIZE * scale
    if train_set["gt_size"] < smallest_gt or train_set["gt_size"] % scale:
        raise OptionError(f"option datasets.train.gt_size must be a multiple of scale {scale} and at least "
                          f"{smallest_gt} (LQ patches of at least {MIN_TRAINING_SIZE} px, which RG-SA needs in "
                          f"training), got {train_set['gt_size']}; the official files use 128 at x2, 192 at x3, "
                          f"256 at x4")
    if not 0 <= train["ema_decay"] < 1:
        raise OptionError(f"option train.ema_decay must lie in [0, 1) (0 keeps no EMA; BasicSR uses 0.999), got "
                          f"{train['ema_decay']}")
    if not train["optim_g"]["lr"] > 0:
        raise OptionError(f"option train.optim_g.lr must be positive, got {train['optim_g']['lr']}")


def load_train_options(path: str | Path, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """A training option file, checked, with ``--force_yml`` overrides applied and defaults filled in."""
    options = check_options(read_option_file(path, overrides), TRAIN_SCHEMA, str(path))
    _convert(options, _TRAIN_NUMBERS)
    _check_scheduler(options["train"])
    _check_ranges(options)
    return options


def load_test_options(path: str | Path, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """A test option file (``datasets: {test_1: ..., test_2: ...}``), checked like a training one."""
    options = check_options(read_option_file(path, overrides), TEST_SCHEMA, str(path))
    _convert(options, (("scale", int),))
    if not options["datasets"]:
        raise OptionError(f"{path}: datasets lists no test set")
    return options


def require_choice(value: Any, dotted: str, choices: Iterable[str]) -> Any:
    choices = list(choices)
    if value not in choices:
        raise OptionError(f"option {dotted}: {value!r} is not supported; use one of {choices}")
    return value


def network_kwargs(network: Mapping[str, Any], dotted: str = "network_g") -> dict[str, Any]:
    """RGT constructor arguments from a ``network_g`` section (keys left unset keep the constructor default)."""
    require_choice(network["type"], f"{dotted}.type", ["RGT"])
    return {key: network[key] for key in NETWORK_ARGUMENTS if network.get(key) is not None}

"""Training and evaluating RGT with BasicSR's option files, experiment layout and checkpoint format."""
from .evaluate import evaluate_set, run_evaluation
from .options import OptionError, load_test_options, load_train_options
from .trainer import Trainer, run_training

__all__ = ["Trainer", "run_training", "run_evaluation", "evaluate_set", "load_train_options", "load_test_options",
           "OptionError"]

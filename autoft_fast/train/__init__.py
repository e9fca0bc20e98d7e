"""Training, evaluation and the strategy runner for AutoFT transfer experiments.

Example:
    >>> from autoft_fast.train import Trainer, TrainConfig, auc
    >>> auc([0, 1], [0.2, 0.9])
    1.0
"""
from .checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_atomic
from .metrics import auc, compute_metrics, is_better, logloss
from .progress import ProgressBar, setup_logging
from .trainer import FitResult, TrainConfig, Trainer, TrainingInterrupted, evaluate, predict

__all__ = ["Trainer", "TrainConfig", "FitResult", "TrainingInterrupted", "evaluate", "predict",
           "auc", "logloss", "compute_metrics", "is_better", "save_atomic", "load_checkpoint",
           "capture_rng_state", "restore_rng_state", "ProgressBar", "setup_logging"]

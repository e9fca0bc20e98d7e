"""Training, evaluation and the strategy runner for AutoFT transfer experiments.

Example:
    >>> from autoft_fast.train import Trainer, TrainConfig, auc
    >>> auc([0, 1], [0.2, 0.9])
    1.0
    >>> from autoft_fast.train.predict import load_run   # a saved run's model: new rows
"""
from .checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_atomic
from .metrics import auc, compute_metrics, is_better, logloss
from .progress import ProgressBar, setup_logging
from .trainer import FitResult, TrainConfig, Trainer, TrainingInterrupted, evaluate
from .trainer import predict as predict_logits
# `autoft_fast.train.predict` is the module of saved runs (load_run); the logits of a model
# on TensorData are `predict_logits` (trainer.predict).
from . import predict
from .predict import load_run

__all__ = ["Trainer", "TrainConfig", "FitResult", "TrainingInterrupted", "evaluate", "predict_logits",
           "predict", "load_run",
           "auc", "logloss", "compute_metrics", "is_better", "save_atomic", "load_checkpoint",
           "capture_rng_state", "restore_rng_state", "ProgressBar", "setup_logging"]

"""Training: optax AdamW, orbax checkpoints with exact resume, grain data, TensorBoard logs."""

from kvjax.training.checkpoint import restore_params
from kvjax.training.trainer import NonFiniteLossError, TrainResult, train

__all__ = ["NonFiniteLossError", "TrainResult", "restore_params", "train"]

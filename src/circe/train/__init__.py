"""Training: one trainer for every trainable method (`circe train`)."""

from circe.train.config import TrainConfig
from circe.train.trainer import TrainResult, resume, train

__all__ = ["TrainConfig", "TrainResult", "resume", "train"]

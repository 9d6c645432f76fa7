"""TEMPORARY shim until the train/ split lands: the training config models."""

from capfilt.train.data import DataSource
from capfilt.train.loop import TrainConfig

__all__ = ["DataSource", "TrainConfig"]

"""Retrieval models built on the index layer."""

from poeem.model.loss import in_batch_softmax
from poeem.model.towers import Tower
from poeem.model.two_tower import ModelConfig, TwoTowerModel

__all__ = ["ModelConfig", "Tower", "TwoTowerModel", "in_batch_softmax"]

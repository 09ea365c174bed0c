"""Retrieval models built on the index layer."""

from poeem.model.config import ModelConfig
from poeem.model.loss import in_batch_softmax
from poeem.model.retrieval import RetrievalModel
from poeem.model.towers import Tower
from poeem.model.two_tower import TwoTowerModel

__all__ = ["ModelConfig", "RetrievalModel", "Tower", "TwoTowerModel", "in_batch_softmax"]

"""The frozen-feature cache's storage: plain numpy and torch."""
from .store import FeatureStore

__all__ = ['FeatureStore']

"""The frozen-feature cache's storage: plain numpy and torch."""
from .store import FeatureStore, check_storage, check_writable

__all__ = ['FeatureStore', 'check_storage', 'check_writable']

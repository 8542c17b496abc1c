"""Local checkpoint loading for MMEngine 0.10 under PyTorch >= 2.6.

PyTorch 2.6 made ``torch.load`` default to ``weights_only=True``; MMEngine
0.10's checkpoints hold its message hub (``HistoryBuffer``, numpy scalars), so
``resume=True`` and ``load_from`` fail there. This registers the local loader
MMEngine had under earlier PyTorch: a full unpickle, so load only checkpoints
you trust (your own runs, official OpenMMLab releases).
"""
import os.path as osp

import torch
from mmengine.runner.checkpoint import CheckpointLoader
from mmengine.utils import digit_version


def load_from_local(filename: str, map_location=None) -> dict:
    """Load a local checkpoint the way MMEngine did before PyTorch 2.6."""
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'{filename} can not be found.')
    return torch.load(filename, map_location=map_location, weights_only=False)


if digit_version(torch.__version__) >= digit_version('2.6.0'):
    CheckpointLoader.register_scheme(prefixes='', loader=load_from_local,
                                     force=True)

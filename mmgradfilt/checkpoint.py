"""Safe local checkpoint loading for MMEngine 0.10 under PyTorch >= 2.6.

PyTorch 2.6 made ``torch.load`` default to ``weights_only=True``. MMEngine 0.10's
checkpoints hold its message hub (``HistoryBuffer``s of numpy arrays, numpy
scalars), so ``resume=True`` and ``load_from`` fail there. This registers a local
loader that keeps ``weights_only=True`` and allows, for its own loads only, the few
globals such checkpoints hold (:data:`ALLOWED`).

A checkpoint with any other global is refused with an error that names it. A file
listed by exact path in the environment variable ``MMGRADFILT_TRUSTED_CHECKPOINTS``
is unpickled in full instead, with a warning: that is the only full unpickle, and
it runs whatever code the file holds.
"""

import logging
import os
import os.path as osp
import pickle
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from mmengine.logging import HistoryBuffer, print_log
from mmengine.runner.checkpoint import CheckpointLoader
from mmengine.utils import digit_version

TRUSTED_ENV = 'MMGRADFILT_TRUSTED_CHECKPOINTS'

SafeGlobal = Callable | tuple[Callable, str]


def _numpy_globals() -> list[SafeGlobal]:
    """The numpy globals of a pickled array or scalar of the dtypes MMEngine
    stores, under the numpy 2 and the numpy 1 module names."""
    # Taken from the pickles themselves: whichever numpy is installed, these are
    # the functions its arrays and scalars reduce to.
    reconstruct = np.zeros(1).__reduce__()[0]
    scalar = np.float64(0).__reduce__()[0]
    named = []
    for module in ('numpy._core.multiarray', 'numpy.core.multiarray'):
        # The unpickler looks globals up by name, and checkpoints written under
        # numpy 1 name the same two functions by its module path.
        named += [
            (reconstruct, f'{module}._reconstruct'),
            (scalar, f'{module}.scalar'),
        ]
    # torch builds a dtype instance with its state only if the dtype's exact class
    # is allowed: float64 and int64 are the message hub's buffers (values, counts)
    # and scalars (``eta``), float32 the metrics kept as a best score (MMSeg's
    # mIoU).
    dtype_classes = [type(np.dtype(t)) for t in (np.float64, np.int64, np.float32)]
    return [*named, np.ndarray, np.dtype, *dtype_classes]


def _history_buffer_method(owner: Any, name: str) -> Callable:
    """Stand in for ``getattr`` while loading: resolve ``HistoryBuffer``'s default
    statistics methods only.

    A pickled ``HistoryBuffer`` carries its statistics registry, and pickle writes
    a method such as ``HistoryBuffer.min`` as ``getattr(HistoryBuffer, 'min')``.
    ``getattr`` itself would reach any attribute of any allowed object.

    Raises:
        pickle.UnpicklingError: Any other attribute, named in the message.
    """
    if owner is HistoryBuffer and name in ('min', 'max', 'current', 'mean'):
        return getattr(HistoryBuffer, name)
    owner_name = getattr(owner, '__qualname__', type(owner).__qualname__)
    path = f'{getattr(owner, "__module__", "?")}.{owner_name}.{name}'
    raise pickle.UnpicklingError(
        f'GLOBAL {path} was not an allowed global (reached through getattr)'
    )


# What a checkpoint of MMEngine's Runner (MMSeg, MMPretrain) holds beyond torch's
# own allowlist: the message hub's buffers with their statistics methods, and
# numpy. Optimizer, scheduler and AMP loss-scaler states, ``meta`` and model-zoo
# files need nothing more (tensors, builtins, OrderedDict and Counter are allowed
# by torch).
ALLOWED: list[SafeGlobal] = [
    HistoryBuffer,
    (_history_buffer_method, 'builtins.getattr'),
    *_numpy_globals(),
]


def trusted_checkpoints() -> set[str]:
    """Resolved paths listed in ``MMGRADFILT_TRUSTED_CHECKPOINTS``.

    The variable holds exact file paths separated by ``os.pathsep`` (``:`` on
    Linux), no patterns or folders; it is read at each load.
    """
    value = os.environ.get(TRUSTED_ENV, '')
    return {osp.realpath(osp.expanduser(p)) for p in value.split(os.pathsep) if p}


def _unsafe_globals(filename: str, error: Exception) -> list[str]:
    """The globals of ``filename`` that the load refused."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(filename)
    except ValueError:  # not a zip checkpoint (saved by PyTorch < 1.6)
        names = []
    if not names:
        # The static scan sees the globals a pickle names, not the class of an
        # object it builds (a numpy dtype outside the list) nor a legacy file:
        # then the unpickler's message names the one it refused.
        found = re.findall(
            r'GLOBAL (\S+) (?:was not an allowed global|whose module)'
            r"|but got <class '([^']+)'>",
            str(error),
        )
        names = [a or b for a, b in found]
    return sorted(names)


def _refusal(filename: str, error: Exception) -> pickle.UnpicklingError:
    """The error for a checkpoint that the weights-only load refused."""
    names = _unsafe_globals(filename, error)
    if names:
        what = f'it holds global(s) that mmgradfilt does not allow: {", ".join(names)}'
    else:
        what = f'weights-only unpickling failed ({error})'
    unlisted = ''
    if os.environ.get(TRUSTED_ENV):
        unlisted = f' ({TRUSTED_ENV} is set but does not list {osp.realpath(filename)})'
    return pickle.UnpicklingError(
        f'Refused to load checkpoint {filename}: {what}. Unpickling it in full would '
        'run code it holds. If you trust this file (your own run, an official '
        f'release), add its path to the environment variable {TRUSTED_ENV} (exact '
        f'file paths separated by "{os.pathsep}"): it is then loaded with '
        f'weights_only=False and a warning is logged{unlisted}.'
    )


def load_from_local(filename: str, map_location: Any = None) -> Any:
    """Load a local checkpoint with ``weights_only=True`` and :data:`ALLOWED`, or in
    full if ``MMGRADFILT_TRUSTED_CHECKPOINTS`` lists it.

    Args:
        filename (str): Path of the checkpoint.
        map_location (Any): As for :func:`torch.load`. Defaults to None.

    Returns:
        Any: The loaded checkpoint.

    Raises:
        pickle.UnpicklingError: The file holds a global outside the allowlist and
            is not listed; the message names the global(s).
    """
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'{filename} can not be found.')
    if osp.realpath(filename) in trusted_checkpoints():
        print_log(
            f'Loading checkpoint {filename} with full unpickling (weights_only='
            f'False) because {TRUSTED_ENV} lists it: code it holds will run.',
            logger='current',
            level=logging.WARNING,
        )
        return torch.load(filename, map_location=map_location, weights_only=False)
    # Allowed for this load only, so that importing mmgradfilt leaves torch.load as
    # strict as it was for the rest of the process. Globals already allowed by
    # someone else are left out: leaving the context would remove them.
    already = torch.serialization.get_safe_globals()
    added = [g for g in ALLOWED if g not in already]
    with torch.serialization.safe_globals(added):
        try:
            return torch.load(filename, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as error:
            raise _refusal(filename, error) from error


if digit_version(torch.__version__) >= digit_version('2.6.0'):
    # Before 2.6 torch.load unpickles in full by default, as MMEngine's own loader
    # expects; from 2.6 on MMEngine loads local files through this one.
    CheckpointLoader.register_scheme(prefixes='', loader=load_from_local, force=True)

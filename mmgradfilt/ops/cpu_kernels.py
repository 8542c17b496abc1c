"""C++ fast paths for the filtered conv's memory-bound steps on CPU.

The same two steps as :mod:`.triton_kernels` (block sums/means, and the
broadcast of the grid input-gradient back to pixels), and the sum over a
kernel's taps with its inverse (the weight gradient shared by all taps): each
one pass at memory speed, where PyTorch's own CPU reductions and expanded
copies over runs of a few elements take about twice as long. Together they are
a :class:`.backend.Backend`.

The source (``csrc/grad_filter_cpu.cpp``) is compiled once per machine, on
first use, with the C++ compiler PyTorch's extensions use, for the host CPU's
instruction set, into PyTorch's extensions cache (``TORCH_EXTENSIONS_DIR``,
else ``~/.cache/torch_extensions``); later processes load the cached library
at once. Without a compiler, or with ``MMGRADFILT_CPU_KERNELS=0``, the
pure-PyTorch :mod:`.reference` runs instead.

Messages go to the ``mmgradfilt.ops.cpu_kernels`` logger (standard
``logging``) at WARNING level, so that they reach stderr with no logging set
up (MMEngine's logger is outside ``logging``'s tree): a compile (about a
minute), a wait on another process's compile, a stale lock removed. The
fallback to the reference is a :func:`warnings.warn`.
"""
import functools
import hashlib
import logging
import os
import os.path as osp
import platform
import time
import warnings
from contextlib import contextmanager
from typing import Iterator, Sequence, Tuple

import torch
from torch import Tensor

try:
    import fcntl
except ImportError:  # Windows: builds run without the stale-lock guard
    fcntl = None

logger = logging.getLogger(__name__)

ENABLED = os.environ.get('MMGRADFILT_CPU_KERNELS', '1') != '0'
_SOURCE = osp.join(osp.dirname(__file__), 'csrc', 'grad_filter_cpu.cpp')
_CFLAGS = ['-O3', '-march=native', '-fopenmp']
_LDFLAGS = ['-fopenmp']
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# the lock file torch's cpp_extension.load holds while it builds
_TORCH_LOCK = 'lock'


def _build_name() -> str:
    """One build per source, flags, instruction set and PyTorch version.

    The kernels use the host CPU's instructions (``-march=native``) and
    PyTorch's C++ ABI, so a cache shared by other machines or environments
    must not mix them; and a library is loaded without asking the build
    system, so a changed source must get a name of its own.
    """
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next(line for line in f
                       if line.startswith(('flags', 'Features')))
    except (OSError, StopIteration):
        cpu = platform.machine() + platform.processor()
    key = hashlib.md5(' '.join([cpu, torch.__version__, *_CFLAGS,
                                *_LDFLAGS]).encode())
    with open(_SOURCE, 'rb') as f:
        key.update(f.read())
    return 'mmgradfilt_cpu_' + key.hexdigest()[:12]


def library_path() -> str:
    """Path of this machine's build of the kernels (existing or to come)."""
    from torch.utils import cpp_extension

    name = _build_name()
    # the folder cpp_extension.load itself would pick (and create)
    build_dir = cpp_extension._get_build_directory(name, verbose=False)
    return osp.join(build_dir, name + cpp_extension.LIB_EXT)


@contextmanager
def _build_lock(build_dir: str) -> Iterator[bool]:
    """Hold this build folder's lock; yields whether it tells stale locks.

    ``cpp_extension.load`` serialises builds with a lock file that names no
    owner (torch's ``FileBaton``: an empty file, removed when the build
    ends), so one left by a killed build makes every later load wait
    forever, silently. This ``flock``, which the OS releases when its
    process dies, tells a live build from a dead one: whoever holds it and
    still finds torch's lock file knows that file is stale.
    """
    if fcntl is None:
        yield False
        return
    path = osp.join(build_dir, 'mmgradfilt_build.lock')
    with open(path, 'a') as f:  # closing it releases the lock
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.warning(
                'mmgradfilt: waiting for another process to compile the CPU '
                'kernels (it holds %s)', path)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield True


def _remove_stale_lock(build_dir: str) -> None:
    """Remove torch's lock file of a build that no process runs."""
    lock = osp.join(build_dir, _TORCH_LOCK)
    try:
        age = time.time() - os.stat(lock).st_mtime
    except FileNotFoundError:
        return
    logger.warning(
        'mmgradfilt: removing the stale build lock %s, left %.0f s ago by an '
        'interrupted build (no process is compiling the CPU kernels)', lock,
        age)
    os.remove(lock)


def _build(library: str) -> None:
    """Compile the kernels into ``library``'s folder (and load them), unless
    the process this one waited for has built them meanwhile."""
    from torch.utils import cpp_extension

    build_dir = osp.dirname(library)
    with _build_lock(build_dir) as tells_stale:
        if osp.exists(library):
            return
        if tells_stale:
            _remove_stale_lock(build_dir)
        logger.warning(
            'mmgradfilt: compiling the CPU kernels into %s (once per machine '
            'and PyTorch version: about a minute)', build_dir)
        cpp_extension.load(
            osp.splitext(osp.basename(library))[0], [_SOURCE],
            extra_cflags=_CFLAGS, extra_ldflags=_LDFLAGS,
            build_directory=build_dir, is_python_module=False)


@functools.lru_cache(maxsize=None)
def loaded() -> bool:
    """Load the kernels, compiled first where no build is cached; False
    (with a warning) where that fails."""
    # importing cpp_extension warns about a missing CUDA toolkit; not needed
    logging.getLogger('torch.utils.cpp_extension').setLevel(logging.ERROR)
    try:
        library = library_path()
        if not osp.exists(library):
            _build(library)
        torch.ops.load_library(library)
    except Exception as err:  # no compiler, no headers: use the reference
        warnings.warn(f'mmgradfilt: CPU kernels unavailable ({err}); using '
                      'the PyTorch path', stacklevel=2)
        return False
    return True


def available(x: Tensor) -> bool:
    """Whether ``x`` can use the C++ kernels."""
    return (ENABLED and x.device.type == 'cpu' and x.dtype in _DTYPES
            and x.dim() == 4 and x.is_contiguous() and loaded())


def block_reduce(x: Tensor, block: Tuple[int, int], mean: bool,
                 dtype: torch.dtype) -> Tensor:
    """Sums (or means) of ``x`` over ``block`` tiles, partial tiles included,
    accumulated in float32 (float64 for float64) and returned in ``dtype``."""
    return torch.ops.mmgradfilt.block_reduce(x, block[0], block[1], mean,
                                             dtype)


def broadcast_blocks(grid: Tensor, block: Tuple[int, int],
                     size: Tuple[int, int], dtype: torch.dtype) -> Tensor:
    """Every pixel gets its grid cell divided by the cell's pixel count.

    Same contract as :func:`.reference.broadcast_blocks`.
    """
    return torch.ops.mmgradfilt.broadcast_blocks(grid.contiguous(), block[0],
                                                 block[1], size[0], size[1],
                                                 dtype)


def sum_taps(weight: Tensor, dims: Sequence[int]) -> Tensor:
    """``weight`` summed over its spatial ``dims`` (a subset of ``(2, 3)``),
    keeping them as size 1."""
    return torch.ops.mmgradfilt.sum_taps(weight, 2 in dims, 3 in dims)


def repeat_taps(grad: Tensor, shape: torch.Size) -> Tensor:
    """``grad``, whose spatial dims are 1 or ``shape``'s, copied to every tap
    of ``shape``."""
    return torch.ops.mmgradfilt.repeat_taps(grad.contiguous(), list(shape))

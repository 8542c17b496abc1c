"""C++ fast paths for the filtered conv's memory-bound steps on CPU.

The same two steps as :mod:`.triton_kernels` (block sums/means, and the
broadcast of the grid input-gradient back to pixels), and the sum over a
kernel's taps with its inverse (the weight gradient shared by all taps): each
one pass at memory speed, where PyTorch's own CPU reductions and expanded
copies over runs of a few elements take about twice as long. The source
(``csrc/grad_filter_cpu.cpp``) is compiled once per machine, on first use, with
the C++ compiler PyTorch's extensions use, for the host CPU's instruction set,
and cached by :func:`torch.utils.cpp_extension.load`. Without a compiler, or
with ``MMGRADFILT_CPU_KERNELS=0``, the pure-PyTorch reference in
:mod:`.grad_filter_conv` runs instead.
"""
import functools
import hashlib
import logging
import os
import os.path as osp
import platform
from typing import Tuple

import torch
from mmengine.logging import print_log
from torch import Tensor

ENABLED = os.environ.get('MMGRADFILT_CPU_KERNELS', '1') != '0'
_SOURCE = osp.join(osp.dirname(__file__), 'csrc', 'grad_filter_cpu.cpp')
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _build_name() -> str:
    """One build per instruction set and PyTorch version: the kernels use the
    host CPU's instructions (``-march=native``) and PyTorch's C++ ABI, so a
    cache shared by other machines or environments must not mix them."""
    try:
        with open('/proc/cpuinfo') as f:
            flags = next(line for line in f
                         if line.startswith(('flags', 'Features')))
    except (OSError, StopIteration):
        flags = platform.machine() + platform.processor()
    key = f'{flags} {torch.__version__}'.encode()
    return 'mmgradfilt_cpu_' + hashlib.md5(key).hexdigest()[:8]


@functools.lru_cache(maxsize=None)
def loaded() -> bool:
    """Compile (first time) and load the kernels; False where that fails."""
    # importing cpp_extension warns about a missing CUDA toolkit; not needed
    logging.getLogger('torch.utils.cpp_extension').setLevel(logging.ERROR)
    from torch.utils import cpp_extension
    print_log('mmgradfilt: loading the CPU kernels (the first time, they are '
              'compiled: about a minute)', logger='current')
    try:
        cpp_extension.load(
            _build_name(), [_SOURCE],
            extra_cflags=['-O3', '-march=native', '-fopenmp'],
            extra_ldflags=['-fopenmp'],
            is_python_module=False)
    except Exception as err:  # no compiler, no headers: use the reference
        print_log(f'mmgradfilt: CPU kernels unavailable ({err}); using the '
                  'PyTorch path', logger='current', level=logging.WARNING)
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

    Same contract as :func:`.grad_filter_conv.broadcast_blocks`.
    """
    return torch.ops.mmgradfilt.broadcast_blocks(grid.contiguous(), block[0],
                                                 block[1], size[0], size[1],
                                                 dtype)


def sum_taps(weight: Tensor) -> Tensor:
    """``weight`` summed over its spatial taps, shape ``(C_out, C_in, 1, 1)``."""
    return torch.ops.mmgradfilt.sum_taps(weight)


def repeat_taps(grad: Tensor, shape: torch.Size) -> Tensor:
    """A ``(C_out, C_in, 1, 1)`` gradient copied to every tap of ``shape``."""
    return torch.ops.mmgradfilt.repeat_taps(grad.contiguous(), list(shape))

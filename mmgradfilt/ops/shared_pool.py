"""One pooled copy of an input that several filtered convs read.

Convs that take the same tensor (the ASPP branches of DeepLabV3 all read the
backbone's output) would each pool it and save their own copy for backward.
:func:`shared_pool` hands the second conv the first one's pooled tensor when
it is the same computation on the same values, so autograd keeps it once.

What a pooled tensor depends on, and so what a hit needs equal:

* the input's values: the same tensor object (checked through a weak
  reference, so a new tensor that reuses a dead one's ``id`` misses) at the
  same ``_version`` (an in-place change in between misses) and with the same
  data pointer, dtype, device, shape and strides (a ``.data`` swap misses);
* the pooling function and its block shape (radius times stride per axis);
  the crop or pad of the grid that differs between convs (their padding and
  output size) happens in backward, on the shared tensor, so it is not part
  of the key. The result's dtype is the input's, and the backend is chosen
  from the input.

Writes that bump no version counter of ``x`` (through ``x.data``, or through
another tensor made on the same memory, e.g. with ``set_`` or from NumPy) are
not seen; autograd's own check of saved tensors misses them too.

Lifetime: the cache holds the input and the pooled tensor only weakly. A
pooled tensor lives as long as some autograd graph saves it (a conv's
backward frees it), and its cache entry (a few small Python objects) goes
with it; the cache never keeps a tensor alive, so where no two convs share an
input memory is as without it. Under a
saved-tensor hook that packs copies (offloading), the first conv's pooled
tensor dies after its forward and later convs pool again: no sharing, same
results.

Threads: dict operations are atomic under the GIL and a hit is only taken
after the full key and the weak references check out, so concurrent callers
may pool twice but never get another input's pooled tensor.
"""
import weakref
from typing import Callable, Dict, Tuple

import torch
from torch import Tensor

from .types import IntPair

Pool = Callable[[Tensor, IntPair], Tensor]

# key -> (weak ref to the input, weak ref to its pooled tensor)
_cache: Dict[tuple, Tuple[weakref.ref, weakref.ref]] = {}


def _key(x: Tensor, block: IntPair, pool: Pool) -> tuple:
    return (id(x), x._version, x.data_ptr(), x.dtype, x.device,
            tuple(x.shape), x.stride(), tuple(block), pool)


def _cacheable(x: Tensor) -> bool:
    """Plain dense tensors with a version counter; subclasses (fake or
    wrapped tensors under tracing) and inference tensors pool every time."""
    return (type(x) is Tensor and x.layout == torch.strided
            and not x.is_inference() and x.device.type != 'meta')


def _forget(key: tuple) -> Callable[[weakref.ref], None]:
    """Callback that drops ``key``'s entry when its pooled tensor dies,
    unless the entry has been replaced since."""

    def callback(ref: weakref.ref) -> None:
        entry = _cache.get(key)
        if entry is not None and entry[1] is ref:
            del _cache[key]

    return callback


def shared_pool(x: Tensor, block: IntPair, pool: Pool) -> Tensor:
    """``pool(x, block)``, or the tensor an earlier call returned for the
    same ``x`` values, ``block`` and ``pool`` while that tensor is alive."""
    if not _cacheable(x):
        return pool(x, block)
    key = _key(x, block, pool)
    entry = _cache.get(key)
    if entry is not None and entry[0]() is x:
        pooled = entry[1]()
        if pooled is not None:
            return pooled
    pooled = pool(x, block)
    _cache[key] = (weakref.ref(x), weakref.ref(pooled, _forget(key)))
    return pooled


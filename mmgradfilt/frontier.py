"""The frontier of a model's frozen part: the tensors it hands to the trained
part, found from ``requires_grad`` on one recorded training forward.

A module is *frozen* when none of its parameters requires grad (modules with
no parameters count as frozen). A *cacheable call* is a call of a frozen
module none of whose tensor inputs requires grad and which is not nested in
another cacheable call: its output is a function of the sample and the frozen
weights alone. The *frontier* is the set of cacheable outputs (one tensor of
an output tuple counts alone) that the loss depends on, found by making every
cacheable output a leaf of autograd and asking which leaves get a gradient:
this sees through functional ops (resize, cat) between the frozen and the
trained part and leaves out outputs that only feed other cacheable calls.

:func:`find_frontier` finds it; :meth:`Frontier.capture` collects the
frontier tensors of a normal forward; :meth:`Frontier.replay` runs the
forward from given frontier tensors without calling the frozen part upstream.
Plain torch: no runner, no config.
"""
import contextlib
import functools
import math
import random
import time
from dataclasses import dataclass, field
from typing import (Any, Callable, Dict, Iterator, List, Optional, Sequence,
                    Tuple, Union)

import numpy as np
import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

CallKey = Tuple[str, int]  # (module path, call number in the forward)
_MISSING = object()
# elements of an output compared between two seeds to find randomness
_SAMPLED_VALUES = 4096
_DTYPES = {'float32': torch.float32, 'float16': torch.float16,
           'bfloat16': torch.bfloat16, 'int8': torch.int8}


@dataclass(frozen=True)
class FrontierTensor:
    """One tensor the frozen part hands to the trained part.

    Attributes:
        path (str): Dotted path of the module whose call returns it.
        call (int): Which call of that module in the forward (0 first),
            counting only calls not nested in a cacheable call.
        index (int, optional): Its position in the call's output tuple or
            list; None when the output is the tensor itself.
        shape (tuple[int]): Its shape for one sample (batch dim left out).
        dtype (torch.dtype): Its dtype in the forward.
    """
    path: str
    call: int
    index: Optional[int]
    shape: Tuple[int, ...]
    dtype: torch.dtype

    @property
    def name(self) -> str:
        """``path``, with ``#call`` after a module's first call and
        ``[index]`` for one tensor of a tuple."""
        name = self.path + (f'#{self.call}' if self.call else '')
        return name + ('' if self.index is None else f'[{self.index}]')

    def bytes_per_sample(self, dtype: Union[str, torch.dtype, None] = None
                         ) -> int:
        """Bytes one sample of it takes in ``dtype`` (default: its own);
        ``int8`` adds a float32 scale per channel (dim 0 of the sample)."""
        dtype = _as_dtype(dtype or self.dtype)
        numel = math.prod(self.shape)
        if dtype == torch.int8:
            return numel + 4 * (self.shape[0] if self.shape else 1)
        return numel * torch.empty((), dtype=dtype).element_size()


@dataclass
class _Call:
    """What pass 1 saw of one cacheable call: its output's structure."""
    key: CallKey
    template: Any  # the output with each tensor replaced by a _TensorMeta


@dataclass(frozen=True)
class _TensorMeta:
    shape: Tuple[int, ...]  # whole shape, batch included
    dtype: torch.dtype
    batch_major: bool  # dim 0 is the batch


@dataclass
class Capture:
    """What :meth:`Frontier.capture` collected in one forward.

    Attributes:
        tensors (list[Tensor]): The frontier tensors (batch-major, detached
            copies), in frontier order; filled when the context exits.
        frozen_seconds (float): Wall time spent in the cacheable calls (the
            frozen forward a replay skips).
    """
    tensors: List[torch.Tensor] = field(default_factory=list)
    frozen_seconds: float = 0.0


class Frontier:
    """The frontier found by :func:`find_frontier`.

    Attributes:
        tensors (list[FrontierTensor]): The frontier tensors in forward order.
        calls (list[tuple[str, int]]): Every cacheable call ``(path, call)``
            in forward order: those a replay skips.
        batch_size (int): The batch size of the recorded forward.
    """

    def __init__(self, model: nn.Module, calls: Sequence[_Call],
                 tensors: Sequence[FrontierTensor], batch_size: int) -> None:
        self.model = model
        self._calls = {c.key: c for c in calls}
        self.calls = [c.key for c in calls]
        self.tensors = list(tensors)
        self.batch_size = batch_size
        self._frontier_calls: Dict[CallKey, List[int]] = {}
        for i, t in enumerate(self.tensors):
            self._frontier_calls.setdefault((t.path, t.call), []).append(i)
        self._modules = {path: model.get_submodule(path)
                         for path in dict.fromkeys(p for p, _ in self.calls)}

    def __len__(self) -> int:
        return len(self.tensors)

    def __bool__(self) -> bool:
        return bool(self.tensors)

    @property
    def specs(self) -> List[Tuple[Tuple[int, ...], torch.dtype]]:
        """``(per-sample shape, dtype)`` of each frontier tensor, for the
        feature store."""
        return [(t.shape, t.dtype) for t in self.tensors]

    @property
    def frozen_modules(self) -> Dict[str, nn.Module]:
        """The modules of the cacheable calls by path: the frozen part a
        replay skips (their parameters and buffers make its output)."""
        return dict(self._modules)

    def bytes_per_sample(self, dtype: Union[str, torch.dtype, None] = None
                         ) -> int:
        """Bytes the frontier of one sample takes in ``dtype`` (default: the
        forward's dtypes)."""
        return sum(t.bytes_per_sample(dtype) for t in self.tensors)

    def table(self, dtype: Union[str, torch.dtype, None] = None
              ) -> List[List[str]]:
        """Rows ``[module output, shape, bytes per sample]`` for the log;
        bytes in ``dtype`` (default: the forward's dtypes)."""
        return [[t.name, 'x'.join(map(str, t.shape)),
                 f'{t.bytes_per_sample(dtype):,}'] for t in self.tensors]

    @contextlib.contextmanager
    def capture(self) -> Iterator[Capture]:
        """Collect the frontier tensors of the forwards run inside.

        The forward runs unchanged; each frontier tensor is copied (detached)
        as its call returns, so an in-place op of the trained part cannot
        change the copy. The cacheable calls are timed. A forward whose
        structure differs from the recorded one raises ``RuntimeError``.

        Yields:
            Capture: ``tensors`` filled when the context exits.
        """
        result = Capture()
        found: Dict[int, torch.Tensor] = {}
        state = dict(inside=None, start=0.0)
        counters = dict.fromkeys(self._modules, 0)

        def pre_hook(path, module, args):
            if state['inside'] is not None:
                return
            key = (path, counters[path])
            counters[path] += 1
            if key in self._calls:
                state['inside'] = (key, module)
                state['start'] = time.perf_counter()

        def post_hook(path, module, args, output):
            inside = state['inside']
            if inside is None or inside[1] is not module:
                return
            key = inside[0]
            state['inside'] = None
            tensors = _all_tensors(output)
            if tensors and tensors[0].is_cuda:
                torch.cuda.synchronize(tensors[0].device)
            result.frozen_seconds += time.perf_counter() - state['start']
            for i in self._frontier_calls.get(key, ()):
                found[i] = _select(output, self.tensors[i].index).detach(
                ).clone()

        handles = []
        try:
            for path, module in self._modules.items():
                handles.append(module.register_forward_pre_hook(
                    functools.partial(pre_hook, path)))
                handles.append(module.register_forward_hook(
                    functools.partial(post_hook, path)))
            yield result
        finally:
            for handle in handles:
                handle.remove()
        missing = [self.tensors[i].name for i in range(len(self.tensors))
                   if i not in found]
        if missing:
            raise RuntimeError(
                f'The forward did not return the frontier tensor(s) '
                f'{", ".join(missing)}: it differs from the recorded one')
        result.tensors = [found[i] for i in range(len(self.tensors))]

    @contextlib.contextmanager
    def replay(self, tensors: Sequence[torch.Tensor]) -> Iterator[None]:
        """Run the forwards inside from the given frontier tensors.

        Frontier calls return ``tensors`` (the same objects at every call, so
        modules that share an input keep sharing it); the other cacheable
        calls return placeholders of their recorded shape that cost no
        memory (zeros expanded); none of them runs, so nothing upstream of
        the frontier runs. The modules' ``forward`` is overridden on the
        instance for the duration of the context.

        Args:
            tensors (Sequence[Tensor]): The frontier tensors of a batch, in
                frontier order, batch-major.
        """
        if len(tensors) != len(self.tensors):
            raise ValueError(f'replay needs {len(self.tensors)} frontier '
                             f'tensor(s), got {len(tensors)}')
        batch = None
        given = []
        for t, spec in zip(tensors, self.tensors):
            if tuple(t.shape[1:]) != spec.shape or (
                    batch is not None and t.shape[0] != batch):
                raise ValueError(
                    f'frontier tensor {spec.name}: expected shape '
                    f'(batch, {", ".join(map(str, spec.shape))}) with one '
                    f'batch size for all, got {tuple(t.shape)}')
            batch = t.shape[0]
            given.append(t if t.dtype == spec.dtype else t.to(spec.dtype))
        device = given[0].device if given else torch.device('cpu')
        counters = dict.fromkeys(self._modules, 0)
        served = set()

        def fake_forward(path, original, *args, **kwargs):
            key = (path, counters[path])
            counters[path] += 1
            call = self._calls.get(key)
            if call is None:  # a call that is not cacheable runs as usual
                return original(*args, **kwargs)
            indices = self._frontier_calls.get(key, ())
            served.add(key)
            by_index = {self.tensors[i].index: given[i] for i in indices}
            return _fill(call.template, by_index, batch, device)

        saved = {}
        try:
            for path, module in self._modules.items():
                saved[path] = module.__dict__.get('forward', _MISSING)
                module.forward = functools.partial(
                    fake_forward, path, module.forward)
            yield
        finally:
            for path, module in self._modules.items():
                if path not in saved:
                    continue
                if saved[path] is _MISSING:
                    del module.forward
                else:
                    module.forward = saved[path]
        unserved = [t.name for t in self.tensors
                    if (t.path, t.call) not in served]
        if unserved:
            raise RuntimeError(
                f'The forward did not call the frontier module(s) '
                f'{", ".join(unserved)}: it differs from the recorded one')


def find_frontier(model: nn.Module,
                  run_loss: Callable[[], torch.Tensor],
                  batch_size: Optional[int] = None,
                  seed: int = 0) -> Frontier:
    """Find the tensors the frozen part of ``model`` hands to its trained
    part.

    Runs ``run_loss`` (one training forward of ``model`` on a fixed batch,
    returning the loss) three times under :func:`torch.random.fork_rng` and
    restores every buffer afterwards, so training is not changed; parameters
    get no ``.grad``. Pass 1 records the cacheable calls, pass 2 makes their
    outputs leaves and asks which ones the loss depends on, pass 3 replays
    the frontier of pass 1 and checks that it gives pass 1's loss.

    Args:
        model (nn.Module): The model as trained (after freezing and any
            surgery), in training mode. Its ``data_preprocessor`` (if any)
            is not part of the search: run it before ``run_loss``.
        run_loss (Callable[[], Tensor]): Runs the forward and returns the
            scalar loss.
        batch_size (int, optional): The batch size, to check that frontier
            tensors are batch-major; None takes it from the first frontier
            tensor. Defaults to None.
        seed (int): Torch seed of passes 1 and 3 (pass 2 uses ``seed + 1``).
            Defaults to 0.

    Returns:
        Frontier: Empty when the loss depends on no cacheable output.

    Raises:
        ValueError: A frozen part whose output is not a function of the
            sample alone (a BatchNorm in training mode, active dropout,
            randomness, batch augments in the data preprocessor), a frontier
            output that is not a tensor or a tuple/list of tensors, or that
            is not batch-major; the message names the module and why.
    """
    preprocessor = getattr(model, 'data_preprocessor', None)
    if getattr(preprocessor, 'batch_augments', None) is not None:
        raise ValueError(
            'data_preprocessor.batch_augments mixes the samples of a batch '
            '(mixup, cutmix): the frozen part\'s output is not a function of '
            'the sample alone, so it cannot be cached')
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError('The model has no trained parameter: no frontier '
                         'between a frozen and a trained part')
    modules = _hookable_modules(model)
    frozen = {path: not any(p.requires_grad for p in m.parameters())
              for path, m in modules.items()}
    devices = {p.device for p in model.parameters()}
    with replayed_rng(*devices), kept_buffers(model):
        torch.manual_seed(seed)
        rec1 = _Recorder(modules, frozen, make_leaves=False)
        with rec1.hooks():
            loss1 = run_loss()
        loss1 = loss1.detach()

        torch.manual_seed(seed + 1)
        rec2 = _Recorder(modules, frozen, make_leaves=True,
                         known={c.key for c in rec1.calls})
        with rec2.hooks():
            loss2 = run_loss()
        _check_deterministic(rec1, rec2)
        if not loss2.requires_grad:
            raise ValueError('The loss does not depend on any trained '
                             'parameter: nothing to cache for')
        leaves = [leaf for _, _, leaf in rec2.leaves]
        grads = (torch.autograd.grad(loss2, leaves, allow_unused=True)
                 if leaves else [])
        del loss2
        reached = {(key, where) for (key, where, _), g in
                   zip(rec2.leaves, grads) if g is not None}
        frontier = _build(model, rec1, reached, batch_size)
        if frontier:
            captured = [
                _select(rec1.outputs[(t.path, t.call)], t.index)
                for t in frontier.tensors]
            del rec1.outputs
            torch.manual_seed(seed)
            with frontier.replay(captured):
                loss3 = run_loss().detach()
            if not torch.allclose(loss3, loss1, rtol=1e-4, atol=1e-6):
                raise ValueError(
                    f'The loss from the frontier tensors ({loss3.item()})'
                    f' differs from the loss of the whole forward '
                    f'({loss1.item()}): the trained part reads a frozen '
                    f'output that the gradient does not reach (read '
                    f'without autograd); the frontier would not be exact')
    return frontier


@contextlib.contextmanager
def replayed_rng(*devices: torch.device) -> Iterator[None]:
    """Run a block with the random number generators (torch's CPU one and
    those of the CUDA ``devices``, Python's, NumPy's global one) as they
    were, and set them back afterwards: the block draws what the next code
    would have drawn, and that code still draws it."""
    devices = sorted({d.index if d.index is not None else
                      torch.cuda.current_device()
                      for d in devices if d.type == 'cuda'})
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


@contextlib.contextmanager
def kept_buffers(model: nn.Module) -> Iterator[None]:
    """Set every buffer of ``model`` (BatchNorm running statistics and
    counts) back to its value and object after the block."""
    saved = [(module, name, buf, buf.clone())
             for module in model.modules()
             for name, buf in module._buffers.items() if buf is not None]
    try:
        yield
    finally:
        with torch.no_grad():
            for module, name, buf, value in saved:
                module._buffers[name] = buf
                buf.copy_(value)


def _hookable_modules(model: nn.Module) -> Dict[str, nn.Module]:
    """Every named submodule but the model itself and its data
    preprocessor (which runs before the forward)."""
    return {path: module for path, module in model.named_modules()
            if path and path != 'data_preprocessor'
            and not path.startswith('data_preprocessor.')}


class _Recorder:
    """Forward hooks of one recorded pass."""

    def __init__(self, modules: Dict[str, nn.Module], frozen: Dict[str, bool],
                 make_leaves: bool, known: Optional[set] = None) -> None:
        self.modules = modules
        self.frozen = frozen
        self.make_leaves = make_leaves
        # the cacheable calls of pass 1: in pass 2 the leaves make the inputs
        # of the later ones require grad
        self.known = known
        self.counters = dict.fromkeys(modules, 0)
        self.stack: List[Optional[CallKey]] = []  # cacheable key or None
        self.inside: Optional[CallKey] = None
        self.calls: List[_Call] = []
        self.outputs: Dict[CallKey, Any] = {}
        # (path, fingerprint) of each frozen call inside a cacheable call
        self.prints: List[Tuple[str, List[Tuple[torch.Tensor, ...]]]] = []
        # (call key, index in the output or None, leaf)
        self.leaves: List[Tuple[CallKey, Any, torch.Tensor]] = []

    @contextlib.contextmanager
    def hooks(self) -> Iterator[None]:
        handles = []
        try:
            for path, module in self.modules.items():
                handles.append(module.register_forward_pre_hook(
                    functools.partial(self.pre_hook, path), with_kwargs=True))
                handles.append(module.register_forward_hook(
                    functools.partial(self.post_hook, path), with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def pre_hook(self, path, module, args, kwargs):
        if self.inside is not None:
            _check_sample_wise(path, module, self.inside[0])
            self.stack.append(None)
            return
        key = (path, self.counters[path])
        self.counters[path] += 1
        if (key in self.known if self.known is not None else
                self.frozen[path] and not _requires_grad((args, kwargs))):
            _check_sample_wise(path, module, path)
            self.inside = key
            self.stack.append(key)
        else:
            self.stack.append(None)

    def post_hook(self, path, module, args, kwargs, output):
        key = self.stack.pop()
        if self.inside is None:
            return None
        self.prints.append((path, _fingerprint(output)))
        if key is None:
            return None
        self.inside = None
        self.calls.append(_Call(key, _template(output)))
        if not self.make_leaves:
            # a copy: the trained part may change the output in place
            self.outputs[key] = _map_tensors(
                output, lambda t, where: t.detach().clone())
            return None
        return self._leaves(key, output)

    def _leaves(self, key: CallKey, output: Any) -> Any:
        """The output with each floating tensor made a leaf of autograd (a
        copy of one, so the trained part may change it in place)."""
        def leaf(t, where):
            if not (torch.is_tensor(t) and t.is_floating_point()):
                return t
            x = t.detach().requires_grad_()
            self.leaves.append((key, where, x))
            return x.clone()
        return _map_tensors(output, leaf)


def _check_sample_wise(path: str, module: nn.Module, call: str) -> None:
    """Refuse a frozen module whose output depends on more than its sample."""
    where = f'{path}' + ('' if path == call else f' (inside {call})')
    if isinstance(module, _BatchNorm) and module.training:
        raise ValueError(
            f'{where}: a frozen BatchNorm in training mode normalises with '
            f'the statistics of the batch (and updates its running ones), so '
            f'its output is not a function of the sample alone and cannot be '
            f'cached; keep frozen BatchNorms in eval mode (norm_eval=True)')
    if module.training and (
            (isinstance(module, _DropoutNd) and module.p > 0)
            or getattr(module, 'drop_prob', 0) > 0):
        raise ValueError(
            f'{where}: active dropout in the frozen part makes its output '
            f'random, so it cannot be cached; put it in eval mode or set its '
            f'probability to 0')


def _check_deterministic(rec1: _Recorder, rec2: _Recorder) -> None:
    """Name the first frozen call whose output changed with the seed."""
    for (path, a), (other, b) in zip(rec1.prints, rec2.prints):
        if path != other or not all(
                _same_print(x, y) for x, y in zip(a, b)) or len(a) != len(b):
            raise ValueError(
                f'{path}: its output differs between two forwards of the same '
                f'batch under different torch seeds: randomness in the frozen '
                f'part, which makes its output not a function of the sample '
                f'alone, so it cannot be cached')
    if len(rec1.prints) != len(rec2.prints):
        path = (rec1.prints if len(rec1.prints) > len(rec2.prints)
                else rec2.prints)[min(len(rec1.prints), len(rec2.prints))][0]
        raise ValueError(f'{path}: the frozen part calls other modules under '
                         f'different torch seeds: randomness in the frozen '
                         f'part, so it cannot be cached')


def _fingerprint(output: Any) -> List[Tuple[torch.Tensor, ...]]:
    """A few sampled values and the sum of each floating tensor."""
    prints = []
    for t in _all_tensors(output):
        if not t.is_floating_point():
            continue
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLED_VALUES)
        # a copy: an in-place op later (ReLU(inplace=True)) changes the output
        prints.append((flat[::step][:_SAMPLED_VALUES].float().cpu().clone(),
                       flat.double().sum().cpu()))
    return prints


def _same_print(a: Tuple[torch.Tensor, ...], b: Tuple[torch.Tensor, ...]
                ) -> bool:
    if a[0].shape != b[0].shape:
        return False
    scale = float(a[0].abs().max()) if a[0].numel() else 0.0
    return (torch.allclose(a[0], b[0], rtol=1e-4, atol=1e-5 * scale)
            and torch.allclose(a[1], b[1], rtol=1e-4,
                               atol=1e-5 * scale * max(1, a[0].numel())))


def _build(model: nn.Module, rec: _Recorder, reached: set,
           batch_size: Optional[int]) -> Frontier:
    """The frontier of pass 1's calls whose outputs reached the loss."""
    tensors = []
    for call in rec.calls:
        wheres = [where for key, where in reached if key == call.key]
        if not wheres:
            continue
        path = call.key[0]
        output = rec.outputs[call.key]
        if torch.is_tensor(output):
            indices = [None]
        elif isinstance(output, (tuple, list)) and all(
                torch.is_tensor(t) for t in output):
            indices = sorted(w[0] for w in wheres)
        else:
            raise ValueError(
                f'{path}: the trained part reads its output, a '
                f'{type(output).__name__}, which the cache cannot hold: the '
                f'frontier outputs must be a Tensor or a tuple/list of '
                f'Tensors')
        for index in indices:
            t = _select(output, index)
            if batch_size is None:
                batch_size = t.shape[0] if t.dim() else None
            if t.dim() == 0 or t.shape[0] != batch_size:
                raise ValueError(
                    f'{path}: its output{"" if index is None else f"[{index}]"}'
                    f' of shape {tuple(t.shape)} is not batch-major (batch '
                    f'size {batch_size}), so it cannot be cached per sample')
            tensors.append(FrontierTensor(path, call.key[1], index,
                                          tuple(t.shape[1:]), t.dtype))
    calls = [_Call(c.key, _meta_template(c.template, batch_size))
             for c in rec.calls]
    return Frontier(model, calls, tensors, batch_size or 0)


def _requires_grad(obj: Any) -> bool:
    return any(t.requires_grad for t in _all_tensors(obj))


def _all_tensors(obj: Any) -> List[torch.Tensor]:
    found: List[torch.Tensor] = []
    _map_tensors(obj, lambda t, where: found.append(t) or t)
    return found


def _map_tensors(obj: Any, fn: Callable, where: Any = None) -> Any:
    """``obj`` with each tensor ``t`` inside tuples, lists and dicts replaced
    by ``fn(t, where)``; ``where`` is the top-level index or key."""
    if torch.is_tensor(obj):
        return fn(obj, where)
    top = where is None
    if isinstance(obj, tuple) and hasattr(obj, '_fields'):  # namedtuple
        return type(obj)(*(_map_tensors(v, fn, (i, ) if top else where)
                           for i, v in enumerate(obj)))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(v, fn, (i, ) if top else where)
                         for i, v in enumerate(obj))
    if isinstance(obj, dict):
        return type(obj)((k, _map_tensors(v, fn, (k, ) if top else where))
                         for k, v in obj.items())
    return obj


def _template(output: Any) -> Any:
    return _map_tensors(output, lambda t, where: _TensorMeta(
        tuple(t.shape), t.dtype, False))


def _meta_template(template: Any, batch_size: Optional[int]) -> Any:
    """Mark the tensors whose dim 0 is the batch (their placeholder follows
    the batch size of a replay)."""
    def mark(obj):
        if isinstance(obj, _TensorMeta):
            return _TensorMeta(obj.shape, obj.dtype, bool(
                obj.shape and batch_size and obj.shape[0] == batch_size))
        if isinstance(obj, tuple) and hasattr(obj, '_fields'):
            return type(obj)(*(mark(v) for v in obj))
        if isinstance(obj, (tuple, list)):
            return type(obj)(mark(v) for v in obj)
        if isinstance(obj, dict):
            return type(obj)((k, mark(v)) for k, v in obj.items())
        return obj
    return mark(template)


def _fill(template: Any, by_index: Dict[Optional[int], torch.Tensor],
          batch: Optional[int], device: torch.device) -> Any:
    """The recorded output structure: the given tensors where the frontier
    is, placeholders elsewhere."""
    def placeholder(meta: _TensorMeta) -> torch.Tensor:
        shape = ((batch, *meta.shape[1:]) if meta.batch_major and batch
                 else meta.shape)
        return torch.zeros((), dtype=meta.dtype, device=device).expand(shape)

    def fill(obj, index):
        if isinstance(obj, _TensorMeta):
            return by_index[index] if index in by_index else placeholder(obj)
        if isinstance(obj, tuple) and hasattr(obj, '_fields'):
            return type(obj)(*(fill(v, i if index is None else -1)
                               for i, v in enumerate(obj)))
        if isinstance(obj, (tuple, list)):
            return type(obj)(fill(v, i if index is None else -1)
                             for i, v in enumerate(obj))
        if isinstance(obj, dict):
            return type(obj)((k, fill(v, -1)) for k, v in obj.items())
        return obj
    return fill(template, None)


def _select(output: Any, index: Optional[int]) -> torch.Tensor:
    return output if index is None else output[index]


def _as_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f'unknown dtype {dtype!r}: one of '
                         f'{", ".join(_DTYPES)}')
    return _DTYPES[dtype]

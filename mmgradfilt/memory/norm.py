"""BatchNorm that keeps patch statistics only, behind a gradient-filtered conv.

In a trained ``conv -> BatchNorm2d -> act`` unit whose conv is a
:class:`~mmgradfilt.layers.GradFilterConv2d` of radius ``r``, the conv's
backward uses only the means of its output gradient (the BN's input gradient)
over the ``r x r`` patches of its output. :class:`FilteredBatchNorm2d`
averages its own output gradient over the same patches and then needs only
patch statistics of its input.

Per channel, with ``xhat`` the normalized input, ``g`` the gradient at the BN
output, ``M = N*H*W`` and ``|P|`` the pixels of patch ``P``, exact BN gives::

    dbeta = sum g,   dgamma = sum g*xhat,
    dx = gamma*invstd * (g - dbeta/M - xhat*dgamma/M).

With ``g`` replaced by its patch means ``g_P`` (patches tiling the map from the
top-left, partial last ones, exactly as the conv tiles them), and ``X_P`` the
patch means of ``xhat``:

* ``dbeta = sum_P |P| g_P`` = the exact ``sum g``;
* ``dgamma' = sum_P |P| g_P X_P``; it misses the exact one by the within-patch
  covariance ``sum_P sum_{p in P} (g_p - g_P)(xhat_p - X_P)``;
* the conv upstream sees only ``avg_P(dx')``, which is linear in ``g`` and
  ``xhat``: ``gamma*invstd * (g_P - dbeta/M - X_P*dgamma'/M)``. The BN emits
  that patch-constant value, so the conv's gradients equal what it would
  compute from the full ``dx'``.

Against exact BN before the same filtered conv (``filter_norm=False``), whose
patch means of ``dx`` are ``gamma*invstd * (g_P - dbeta/M - X_P*dgamma/M)``,
exactly two things change: the BN's weight gradient (``dgamma'`` for
``dgamma``), and through the scalar ``dgamma'/M`` per channel, the conv's
input, weight and bias gradients. The BN's bias gradient is exact, and so is
everything when ``g`` is already patch-constant. The backward keeps ``X_P``
(``1/r^2`` of the input), ``invstd`` and ``gamma``; the forward output and the
running statistics are those of ``nn.BatchNorm2d``.

In eval mode (running statistics, as under MMPretrain's ``norm_eval=True``)
with a trainable affine, ``xhat = (x - running_mean) * invstd`` with
``invstd`` from the running variance, fixed in the batch, and exact BN gives::

    dbeta = sum g,   dgamma = sum g*xhat,   dx = gamma*invstd * g.

With ``g`` patch-averaged as above, ``dbeta`` stays exact and
``dgamma' = sum_P |P| g_P X_P`` as in training mode, from the patch means
``X_P`` of ``xhat``. ``dx`` does not involve ``dgamma``: its patch means
``gamma*invstd * g_P`` are those of the exact ``dx``, so the conv's gradients
are exactly those of ``filter_norm=False`` and the layer emits the exact
``dx`` (no patch averaging to do). Only ``dgamma`` changes; the backward keeps
``X_P`` (none when the weight is frozen), ``invstd`` and ``gamma``.
"""
import warnings
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from ..ops import GradFilterConv2dFunction
from ..ops.backend import select
from ..ops.grad_filter_conv import sum_patches
from ..ops.types import IntPair, RadiusType, check_radius

__all__ = [
    'FilteredBatchNormFunction', 'filtered_batch_norm', 'FilteredBatchNorm2d'
]


def _channels(t: Tensor) -> Tensor:
    """A per-channel vector shaped to broadcast over ``(N, C, H, W)``."""
    return t.view(1, -1, 1, 1)


def _patch_sizes(x: Tensor, radius: IntPair) -> Tensor:
    """``|P|`` of each patch of ``x``'s map, through the tiling of the sums."""
    return sum_patches(x.new_ones(1, 1, *x.shape[-2:]), radius)


class FilteredBatchNormFunction(torch.autograd.Function):
    """Batch-norm forward, patch-filtered backward (batch or running
    statistics)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Optional[Tensor],
                bias: Optional[Tensor], running_mean: Optional[Tensor],
                running_var: Optional[Tensor], training: bool,
                momentum: float, eps: float, radius: IntPair) -> Tensor:
        # the op F.batch_norm runs on CPU (cuDNN's on CUDA agrees within
        # rounding); in training mode it also returns the batch mean and
        # 1/std (float32 for 16-bit inputs): one pass over x for both
        out, mean, invstd = torch.native_batch_norm(x, weight, bias,
                                                    running_mean, running_var,
                                                    training, momentum, eps)
        if not training:
            stat = torch.promote_types(x.dtype, torch.float32)
            mean = running_mean.to(stat)
            invstd = running_var.to(stat).add(eps).rsqrt_()
        need_x, need_w = ctx.needs_input_grad[:2]
        # training-mode dx needs dgamma' even for a frozen weight; eval-mode
        # dx needs no statistics of x at all
        xhat = None
        if need_w or (training and need_x):
            # xhat is affine in x, so its patch means are those of x,
            # normalized; from float32 sums, so that 16-bit means keep the
            # digits that the centering leaves
            means = sum_patches(x, radius) / _patch_sizes(x, radius)
            xhat = ((means.to(mean) - _channels(mean)) *
                    _channels(invstd)).to(x.dtype)
        ctx.save_for_backward(xhat, invstd, weight)
        ctx.training = training
        ctx.radius = radius
        ctx.size = tuple(x.shape[-2:])
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        xhat, invstd, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        scale = invstd if weight is None else weight.to(invstd) * invstd
        batch_dx = need_x and ctx.training
        grad_x = grad_w = grad_b = None
        if need_x and not batch_dx:
            # gamma*invstd * g: exact, and so are its patch means
            grad_x = grad_out * _channels(scale.to(grad_out.dtype))
        if not (need_w or need_b or batch_dx):
            return (grad_x, None, None, None, None, None, None, None, None)
        # the patch sums |P| g_P are all the rest of the backward reads of
        # grad_out
        g_sums = sum_patches(grad_out, ctx.radius)
        grad_b = g_sums.sum((0, 2, 3))
        if xhat is not None:
            xhat = xhat.to(g_sums.dtype)
            grad_w = (g_sums * xhat).sum((0, 2, 3))
        if batch_dx:
            m = grad_out.numel() // grad_out.shape[1]
            count = _patch_sizes(grad_out, ctx.radius)
            shift = torch.addcmul(_channels(grad_b / m), xhat,
                                  _channels(grad_w / m)).mul_(count)
            dx_sums = (g_sums - shift).mul_(_channels(scale.to(g_sums)))
            # each pixel gets its patch's mean: the patch-constant dx
            grad_x = select(dx_sums).broadcast_blocks(
                dx_sums, ctx.radius, ctx.size, grad_out.dtype)
        # an affine BN has both parameters, in one dtype
        return (grad_x, grad_w.to(weight.dtype) if need_w else None,
                grad_b.to(weight.dtype) if need_b else None, None, None, None,
                None, None, None)


def filtered_batch_norm(x: Tensor,
                        weight: Optional[Tensor],
                        bias: Optional[Tensor],
                        running_mean: Optional[Tensor],
                        running_var: Optional[Tensor],
                        momentum: float,
                        eps: float,
                        radius: RadiusType = 4,
                        training: bool = True) -> Tensor:
    """BatchNorm whose backward averages the output gradient over ``radius``
    patches (see the module docstring).

    Args:
        x (Tensor): Input of shape ``(N, C, H, W)``.
        weight, bias (Tensor, optional): Affine parameters of shape ``(C,)``.
        running_mean, running_var (Tensor, optional): Running statistics:
            updated in place as ``F.batch_norm(training=True)`` updates them
            when ``training``, else the statistics that normalize ``x``.
        momentum (float): Weight of this batch in the running statistics.
        eps (float): Added to the variance.
        radius (int | tuple[int, int]): Patch size of the conv that feeds
            ``x``. Defaults to 4.
        training (bool): Normalize with the batch's statistics, else with the
            running ones (which must then be given). Defaults to True.

    Returns:
        Tensor: ``F.batch_norm(x, running_mean, running_var, weight, bias,
        training, momentum, eps)``: the same op on CPU, within rounding of
        cuDNN's on CUDA.
    """
    if not training and (running_mean is None or running_var is None):
        raise ValueError('training=False normalizes with running_mean and '
                         'running_var: both are needed')
    return FilteredBatchNormFunction.apply(x, weight, bias, running_mean,
                                           running_var, training, momentum,
                                           eps, check_radius(radius))


class FilteredBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that keeps patch means of its normalized input only.

    Meant right after a :class:`~mmgradfilt.layers.GradFilterConv2d` of the
    same ``radius`` (:func:`mmgradfilt.surgery.install_filtered_norm` puts
    it there). It runs
    :func:`filtered_batch_norm` in training mode when a gradient is needed,
    and in eval mode when its weight or bias trains (MMPretrain's
    ``norm_eval=True`` on trained layers); otherwise (no gradient, or frozen
    in eval mode, whose exact ``dx = gamma * invstd * g`` has nothing to
    filter) it is ``nn.BatchNorm2d``. An input that needs a gradient but does not come
    straight from a filtered conv of this radius would get a patch-constant
    gradient the conv does not expect: such a batch takes the exact BN (and a
    warning names the layer once). Parameters,
    buffers and state_dict keys are those of ``nn.BatchNorm2d``.

    Args:
        num_features, eps, momentum, affine, track_running_stats, device,
            dtype: As ``nn.BatchNorm2d``.
        radius (int | tuple[int, int]): Patch size of the conv feeding this
            layer. Defaults to 4.
    """

    def __init__(self,
                 num_features: int,
                 eps: float = 1e-5,
                 momentum: Optional[float] = 0.1,
                 affine: bool = True,
                 track_running_stats: bool = True,
                 device=None,
                 dtype=None,
                 radius: RadiusType = 4) -> None:
        super().__init__(num_features, eps, momentum, affine,
                         track_running_stats, device, dtype)
        self.radius = check_radius(radius)
        self._warned_input = False

    @classmethod
    def from_bn(cls, bn: _BatchNorm,
                radius: RadiusType) -> 'FilteredBatchNorm2d':
        """A filtered BN sharing ``bn``'s ``Parameter`` and buffer objects."""
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine,
                  bn.track_running_stats, device='meta', radius=radius)
        for name in (*new._parameters, *new._buffers):
            setattr(new, name, getattr(bn, name))
        new.train(bn.training)
        return new

    def extra_repr(self) -> str:
        return f'{super().extra_repr()}, radius={self.radius}'

    def forward(self, x: Tensor) -> Tensor:
        batch_stats = self.training or (self.running_mean is None
                                        and self.running_var is None)
        # with running statistics only a trained affine has a gradient that
        # reads the batch: dx = gamma * invstd * g keeps nothing of it
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad
            for t in ((x, self.weight, self.bias) if batch_stats else
                      (self.weight, self.bias)))
        if not needs_grad or x.numel() == 0 or not self._fed_by_filter(x):
            return super().forward(x)
        self._check_input_dim(x)
        # the running-statistics bookkeeping of nn.BatchNorm2d's forward
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        track = not self.training or self.track_running_stats
        return filtered_batch_norm(
            x, self.weight, self.bias, self.running_mean if track else None,
            self.running_var if track else None, momentum, self.eps,
            self.radius, batch_stats)

    def _fed_by_filter(self, x: Tensor) -> bool:
        """Whether ``x``'s gradient goes to a filtered conv of this radius
        (or nowhere); warn once if not."""
        node = x.grad_fn
        if not x.requires_grad or (
                getattr(node, '_forward_cls', None) is GradFilterConv2dFunction
                and node.radius == self.radius):
            return True
        if not self._warned_input:
            self._warned_input = True
            source = type(node).__name__ if node is not None else 'a leaf'
            warnings.warn(f'{self!r}: its input comes from {source}, not '
                          f'from a GradFilterConv2d of radius {self.radius}, '
                          'so it runs as an exact BatchNorm2d', stacklevel=2)
        return False

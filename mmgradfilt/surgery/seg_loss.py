"""Putting the banded segmentation loss (:mod:`mmgradfilt.memory.seg_loss`)
on an MMSeg decode head: which heads it fits, and the ``loss_by_feat`` that
runs it."""
import functools
from typing import Dict, Optional

import torch.nn as nn
from torch import Tensor

from ..memory.seg_loss import BAND_BYTES, CETerm, lean_seg_loss


def _loss_terms(head) -> list:
    """The head's ``loss_decode`` modules, as a list."""
    losses = head.loss_decode
    return list(losses) if isinstance(losses, nn.ModuleList) else [losses]


def lean_loss_support(head) -> Optional[str]:
    """None if :func:`install_lean_loss` supports ``head``, else why not.

    Supported: an MMSeg ``BaseDecodeHead`` whose class keeps the base
    ``loss_by_feat``, without a sampler, each ``loss_decode`` a plain
    softmax ``CrossEntropyLoss`` with ``reduction='mean'``.
    """
    try:
        from mmseg.models.decode_heads.decode_head import BaseDecodeHead
        from mmseg.models.losses import CrossEntropyLoss
    except ImportError:
        return 'mmsegmentation is not installed'
    name = type(head).__name__
    if not isinstance(head, BaseDecodeHead):
        return f'{name} is not a BaseDecodeHead'
    if type(head).loss_by_feat is not BaseDecodeHead.loss_by_feat:
        return f'{name} has its own loss_by_feat'
    if head.sampler is not None:
        return f'head has a sampler ({type(head.sampler).__name__})'
    for loss in _loss_terms(head):
        kind = type(loss).__name__
        if type(loss) is not CrossEntropyLoss:
            return f'loss_decode {kind} is not supported'
        for flag in ('use_sigmoid', 'use_mask'):
            if getattr(loss, flag):
                return f'loss_decode {kind} with {flag}=True is not supported'
        if loss.reduction != 'mean':
            return (f"loss_decode {kind} with reduction={loss.reduction!r} "
                    "is not supported")
        if loss.class_weight is not None and (
                len(loss.class_weight) != head.out_channels):
            return (f'loss_decode {kind} has {len(loss.class_weight)} class '
                    f'weights for {head.out_channels} classes')
    return None


def _lean_loss_by_feat(head, seg_logits: Tensor, batch_data_samples: list,
                       band_bytes: int = BAND_BYTES) -> Dict[str, Tensor]:
    """``BaseDecodeHead.loss_by_feat`` of ``head``, in bands."""
    seg_label = head._stack_batch_gt(batch_data_samples)
    losses_decode = _loss_terms(head)
    terms = [CETerm(
        float(loss.loss_weight),
        None if loss.class_weight is None else tuple(
            float(w) for w in loss.class_weight),
        bool(loss.avg_non_ignore)) for loss in losses_decode]
    values, acc = lean_seg_loss(seg_logits, seg_label, terms,
                                head.ignore_index, head.align_corners,
                                band_bytes)
    loss: Dict[str, Tensor] = {}
    # summed per loss_name in loss_decode's order, as MMSeg does
    for module, value in zip(losses_decode, values.unbind()):
        name = module.loss_name
        loss[name] = loss[name] + value if name in loss else value
    loss['acc_seg'] = acc
    return loss


def install_lean_loss(head, band_bytes: int = BAND_BYTES) -> None:
    """Make ``head.loss_by_feat`` the banded loss, on this instance only.

    The class and other heads keep MMSeg's loss; :func:`remove_lean_loss`
    restores it. Installing again replaces the previous banded loss.

    Args:
        head (BaseDecodeHead): A head that :func:`lean_loss_support` accepts.
        band_bytes (int): See :func:`lean_seg_loss`. Defaults to
            :data:`BAND_BYTES`.

    Raises:
        ValueError: If ``head`` is not supported (the message says why).
    """
    reason = lean_loss_support(head)
    if reason is not None:
        raise ValueError(f'cannot make the loss of {type(head).__name__} '
                         f'lean: {reason}')
    # a partial, not a bound method, so that deepcopy and pickle keep it
    head.loss_by_feat = functools.partial(_lean_loss_by_feat, head,
                                          band_bytes=band_bytes)


def remove_lean_loss(head) -> None:
    """Give ``head`` back its class's ``loss_by_feat`` (no-op if not lean)."""
    installed = vars(head).get('loss_by_feat')
    if isinstance(installed, functools.partial) and (
            installed.func is _lean_loss_by_feat):
        del head.loss_by_feat

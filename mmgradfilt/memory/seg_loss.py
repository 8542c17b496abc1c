"""MMSeg's decode-head loss in bands of rows, keeping only head-size logits.

``BaseDecodeHead.loss_by_feat`` upsamples the logits to the label size and
runs the cross-entropy there: autograd keeps the full-resolution
log-probabilities and the int64 labels, and the upsampled logits, their
log-probabilities and their gradient are all alive at the loss's peak. Here
the upsampling and the cross-entropy run over bands of output rows, in
forward and again in backward, so only one band's full-resolution tensors
exist at a time; backward keeps the head-resolution logits and the labels in
the smallest integer type that holds them. Values and gradients are those of
MMSeg's loss up to rounding.

Plain torch; :mod:`mmgradfilt.surgery.seg_loss` checks an MMSeg head and
installs the banded loss on it.
"""
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

#: Bytes of one band of full-resolution logits. A band's forward or backward
#: holds about three such tensors (the band, its softmax and the autograd
#: temporaries of the upsampling), well below a frozen ResNet's forward.
BAND_BYTES = 8 * 2**20

# MMSeg adds float32's eps to the divisors of the loss and the accuracy,
# whatever the dtype of the logits
_EPS = torch.finfo(torch.float32).eps


class CETerm(NamedTuple):
    """One softmax cross-entropy term of a decode head's loss.

    Args:
        loss_weight (float): Factor of the term. Defaults to 1.0.
        class_weight (tuple[float], optional): Weight of each class.
            Defaults to None (all 1).
        avg_non_ignore (bool): Leave the ignored pixels out of the divisor
            of the mean. Defaults to False.
    """

    loss_weight: float = 1.0
    class_weight: Optional[Tuple[float, ...]] = None
    avg_non_ignore: bool = False


def compact_labels(labels: Tensor) -> Tensor:
    """``labels`` in the smallest integer dtype that holds all its values."""
    if labels.numel() == 0:
        return labels.to(torch.uint8)
    lo, hi = (int(v) for v in torch.aminmax(labels))
    for dtype in (torch.uint8, torch.int8, torch.int16, torch.int32):
        info = torch.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return labels.to(dtype)
    return labels.to(torch.int64)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays, anything narrower runs in float32 (as autocast would)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _RowTaps(NamedTuple):
    """For each output row: its two source rows and the second one's weight."""

    first: List[int]
    second: List[int]
    first_index: Tensor
    second_index: Tensor
    weight: Tensor


def _row_taps(in_size: int, out_size: int, align_corners: bool,
              dtype: torch.dtype, device: torch.device) -> _RowTaps:
    """Source rows of ``F.interpolate(mode='bilinear')`` along the height.

    The scale, source coordinate and weight follow PyTorch's kernel (in the
    dtype it computes them in), so a band equals those rows of the full
    upsampling up to rounding.
    """
    size = torch.tensor(float(in_size), dtype=dtype)
    dst = torch.arange(out_size, dtype=dtype)
    if align_corners:
        scale = (size - 1) / (out_size - 1) if out_size > 1 else size * 0
        src = scale * dst
    else:
        src = (size / out_size * (dst + 0.5) - 0.5).clamp_min(0)
    first = src.long()  # floor, src >= 0
    second = (first + 1).clamp_max(in_size - 1)
    return _RowTaps(first.tolist(), second.tolist(), first.to(device),
                    second.to(device), (src - first).to(device))


def _upsample_band(rows: Tensor, taps: _RowTaps, start: int, stop: int,
                   width: int, align_corners: bool) -> Tensor:
    """Output rows ``start:stop`` of the bilinear upsampling.

    ``rows`` holds the input rows from ``taps.first[start]`` on. The height
    is interpolated here, on the narrow input; ``F.interpolate`` then does
    the width, its height scale being exactly 1 (an identity).
    """
    offset = taps.first[start]
    weight = taps.weight[start:stop, None]
    narrow = (rows.index_select(2, taps.first_index[start:stop] - offset)
              * (1 - weight)
              + rows.index_select(2, taps.second_index[start:stop] - offset)
              * weight)
    return F.interpolate(narrow, size=(stop - start, width), mode='bilinear',
                         align_corners=align_corners)


def _bands(height: int, band_rows: int) -> Iterator[Tuple[int, int]]:
    """``(start, stop)`` of each band of ``band_rows`` rows, the last shorter."""
    for start in range(0, height, band_rows):
        yield start, min(height, start + band_rows)


class _BandedSegLoss(torch.autograd.Function):
    """Upsampling + cross-entropy terms + accuracy, band by band."""

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, terms: Tuple[CETerm, ...],
                ignore_index: int, align_corners: bool,
                band_rows: int) -> Tuple[Tensor, Tensor]:
        classes, height = logits.shape[1:3]
        out_h, out_w = labels.shape[-2:]
        dtype = _compute_dtype(logits.dtype)
        valid = labels != ignore_index
        bad = valid & ((labels < 0) | (labels >= classes))
        if bad.any():
            raise IndexError(f'label {int(labels[bad][0])} is out of range '
                             f'for {classes} classes')
        del valid, bad
        weights = _class_weights(terms, classes, dtype, logits.device)
        taps = _row_taps(height, out_h, align_corners, dtype, logits.device)
        sums = torch.zeros(len(terms), dtype=torch.float64,
                           device=logits.device)
        # pixels per class, the last slot counting the ignored ones
        counts = torch.zeros(classes + 1, dtype=torch.int64,
                             device=logits.device)
        correct = torch.zeros((), dtype=torch.int64, device=logits.device)
        with torch.autocast(logits.device.type, enabled=False):
            for start, stop in _bands(out_h, band_rows):
                band = _upsample_band(
                    logits[:, :, taps.first[start]:taps.second[stop - 1] + 1]
                    .to(dtype), taps, start, stop, out_w, align_corners)
                slot, target = _targets(labels[:, start:stop], ignore_index,
                                        classes)
                nll = (torch.logsumexp(band, 1)
                       - band.gather(1, target).squeeze(1))
                # weights[:, classes] is 0: ignored pixels add nothing
                sums += (weights[:, slot] * nll).flatten(1).sum(1)
                counts += torch.bincount(slot.flatten(), minlength=classes + 1)
                # topk, as MMSeg's accuracy: among equal logits it need not
                # pick the first class, as argmax would
                hit = band.topk(1, dim=1).indices == target
                correct += (hit.squeeze(1) & (slot < classes)).sum()
                del band
        divisors = _divisors(terms, weights, counts, ignore_index)
        losses = torch.stack([
            t.loss_weight * (s / d)
            for t, s, d in zip(terms, sums.unbind(), divisors)]).to(dtype)
        n_valid = int(counts[:classes].sum())
        acc = (correct.float().reshape(1) + _EPS).mul_(100.0 / (n_valid + _EPS))
        ctx.mark_non_differentiable(acc)
        ctx.save_for_backward(logits, labels)
        ctx.config = (terms, ignore_index, align_corners, band_rows, divisors)
        return losses, acc

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_losses: Tensor,
                 _grad_acc: Tensor) -> Tuple[Optional[Tensor], ...]:
        logits, labels = ctx.saved_tensors
        terms, ignore_index, align_corners, band_rows, divisors = ctx.config
        classes, height = logits.shape[1:3]
        out_h, out_w = labels.shape[-2:]
        dtype = _compute_dtype(logits.dtype)
        # d loss_k / d logit = loss_weight_k / divisor_k * w_k[y] *
        # (softmax - onehot(y)): one factor per class for all terms together
        scale = grad_losses.double() * torch.tensor(
            [t.loss_weight / d for t, d in zip(terms, divisors)],
            dtype=torch.float64, device=logits.device)
        factor = (scale[:, None] * _class_weights(
            terms, classes, dtype, logits.device)).sum(0).to(dtype)
        taps = _row_taps(height, out_h, align_corners, dtype, logits.device)
        grad = torch.zeros(logits.shape, dtype=dtype, device=logits.device)
        with torch.autocast(logits.device.type, enabled=False):
            for start, stop in _bands(out_h, band_rows):
                first, last = taps.first[start], taps.second[stop - 1] + 1
                with torch.enable_grad():
                    rows = logits[:, :, first:last].detach().to(dtype)
                    rows.requires_grad_()
                    band = _upsample_band(rows, taps, start, stop, out_w,
                                          align_corners)
                slot, target = _targets(labels[:, start:stop], ignore_index,
                                        classes)
                grad_band = torch.softmax(band.detach(), 1)
                grad_band.scatter_add_(1, target, grad_band.new_full(
                    target.shape, -1.0))
                grad_band.mul_(factor[slot].unsqueeze(1))
                grad[:, :, first:last] += torch.autograd.grad(
                    band, rows, grad_band)[0]
                del band, grad_band
        return grad.to(logits.dtype), None, None, None, None, None


def _class_weights(terms: Sequence[CETerm], classes: int, dtype: torch.dtype,
                   device: torch.device) -> Tensor:
    """(terms, classes + 1) float64 table: each term's class weights, then a
    0 for the ignored pixels' slot.

    The weights are rounded to ``dtype`` first, as MMSeg makes them a tensor
    of the logits' dtype.
    """
    table = torch.zeros(len(terms), classes + 1, dtype=torch.float64,
                        device=device)
    for row, term in zip(table, terms):
        row[:classes] = (1.0 if term.class_weight is None else torch.tensor(
            term.class_weight, dtype=dtype, device=device).double())
    return table


def _divisors(terms: Sequence[CETerm], weights: Tensor, counts: Tensor,
              ignore_index: int) -> List[float]:
    """The divisor of each term's mean, as MMSeg 1.x's ``cross_entropy``.

    That is the number of pixels, or with class weights the sum of the
    pixels' class weights; ``avg_non_ignore`` leaves the ignored pixels out.
    MMSeg adds float32's eps either way. It looks the class weight up for the
    ignored pixels too (before dropping them with ``avg_non_ignore``), which
    fails when ``ignore_index`` is not a class index: so does this.
    """
    classes = counts.numel() - 1
    ignored = int(counts[classes])
    divisors = []
    for term, row in zip(terms, weights):
        if term.class_weight is None:
            total = float(counts.sum() - ignored * term.avg_non_ignore)
        else:
            if ignored and not -classes <= ignore_index < classes:
                raise IndexError(
                    f'MMSeg\'s cross_entropy looks up class_weight (of '
                    f'{classes} classes) for every label, ignore_index '
                    f'{ignore_index} included; without the lean loss this '
                    'batch fails the same way')
            total = float((row[:classes] * counts[:classes]).sum())
            if not term.avg_non_ignore and ignored:
                # a negative index wraps around, as in MMSeg's lookup
                total += ignored * float(row[ignore_index % classes])
        divisors.append(total + _EPS)
    return divisors


def _targets(labels: Tensor, ignore_index: int,
             classes: int) -> Tuple[Tensor, Tensor]:
    """A band's class slots (``classes`` where ignored) and gather indices."""
    labels = labels.long()
    slot = torch.where(labels == ignore_index, classes, labels)
    return slot, slot.clamp_max(classes - 1).unsqueeze(1)


def lean_seg_loss(logits: Tensor,
                  labels: Tensor,
                  terms: Sequence[CETerm],
                  ignore_index: int = 255,
                  align_corners: bool = False,
                  band_bytes: int = BAND_BYTES) -> Tuple[Tensor, Tensor]:
    """Cross-entropy terms and pixel accuracy of bilinearly upsampled logits.

    The same as upsampling ``logits`` to the labels' size with
    ``F.interpolate(mode='bilinear')`` and applying MMSeg's softmax
    ``cross_entropy`` (``reduction='mean'``) for each term and its
    ``accuracy``, but computed in bands of rows so that autograd keeps only
    ``logits`` and the labels (compacted, see :func:`compact_labels`). As in
    MMSeg 1.x, a term with class weights divides by the sum of the pixels'
    class weights, not by their number.

    Args:
        logits (Tensor): (N, C, h, w) logits at the head's resolution.
        labels (Tensor): (N, H, W) or (N, 1, H, W) integer labels.
        terms (Sequence[CETerm]): The loss terms.
        ignore_index (int): Label of the pixels to ignore. Defaults to 255.
        align_corners (bool): As in ``F.interpolate``. Defaults to False.
        band_bytes (int): Bytes of one band of upsampled logits; the band
            has at least one row. Defaults to :data:`BAND_BYTES`.

    Returns:
        tuple[Tensor, Tensor]: The (len(terms),) loss values, each times its
        ``loss_weight``, and the (1,) float32 accuracy in percent.
    """
    if labels.dim() == 4:
        labels = labels.squeeze(1)
    if logits.dim() != 4 or labels.dim() != 3 or (
            labels.shape[0] != logits.shape[0]):
        raise ValueError(f'expected (N, C, h, w) logits and (N, H, W) labels, '
                         f'got {tuple(logits.shape)} and {tuple(labels.shape)}')
    if not terms:
        raise ValueError('terms is empty')
    num, classes, _, _ = logits.shape
    row_bytes = max(1, num * classes * labels.shape[-1] * torch.finfo(
        _compute_dtype(logits.dtype)).bits // 8)
    band_rows = max(1, band_bytes // row_bytes)
    return _BandedSegLoss.apply(logits, compact_labels(labels), tuple(terms),
                                ignore_index, align_corners, band_rows)

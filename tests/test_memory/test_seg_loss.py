import copy
import pickle
import warnings

import pytest
import torch
import torch.nn as nn
from mmengine.registry import DefaultScope
from mmengine.structures import PixelData

pytest.importorskip('mmseg', reason='needs MMSegmentation')

from mmseg.registry import MODELS  # noqa: E402
from mmseg.structures import SegDataSample  # noqa: E402

from mmgradfilt.benchmark import SavedTensorMeter  # noqa: E402
from mmgradfilt.benchmark.memory import peak_memory_bytes  # noqa: E402
from mmgradfilt.memory.seg_loss import (  # noqa: E402
    CETerm, compact_labels, lean_seg_loss)
from mmgradfilt.surgery import (  # noqa: E402
    install_lean_loss, lean_loss_support, remove_lean_loss)



@pytest.fixture(autouse=True)
def mmseg_scope():
    """MMSeg's heads build in MMSeg's scope, whatever scope an earlier test
    set (the registry looks the type up in the current default scope)."""
    with DefaultScope.overwrite_default_scope('mmseg'):
        yield

def ce(**kwargs):
    return dict(type='CrossEntropyLoss', **kwargs)


def build_head(loss_decode, num_classes=5, **kwargs):
    """A real MMSeg decode head; only its loss is used."""
    with warnings.catch_warnings():
        # CrossEntropyLoss warns about avg_non_ignore=False
        warnings.simplefilter('ignore')
        return MODELS.build(dict(
            type='FCNHead', in_channels=4, channels=4, num_convs=1,
            num_classes=num_classes, loss_decode=loss_decode, **kwargs))


def samples(labels):
    return [SegDataSample(gt_sem_seg=PixelData(data=label[None]))
            for label in labels]


def random_labels(shape, classes, ignore_index=255, ignored=0.2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, shape, generator=gen)
    if ignored:
        labels[torch.rand(shape, generator=gen) < ignored] = ignore_index
    return labels


def losses_and_grad(head, logits, data_samples):
    """``loss_by_feat``'s dict and the gradient of its losses' sum."""
    logits = logits.detach().requires_grad_()
    loss = head.loss_by_feat(logits, data_samples)
    total = sum(v for k, v in loss.items() if k.startswith('loss_'))
    return loss, torch.autograd.grad(total, logits)[0]


def compare(head, logits, labels, band_bytes, rtol, atol_acc=0.0):
    """The banded loss against MMSeg's ``loss_by_feat`` on the same head."""
    data_samples = samples(labels)
    want, want_grad = losses_and_grad(head, logits, data_samples)
    install_lean_loss(head, band_bytes=band_bytes)
    got, got_grad = losses_and_grad(head, logits, data_samples)
    remove_lean_loss(head)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].shape == want[key].shape, key
        assert got[key].dtype == want[key].dtype, key
    for key in want.keys() - {'acc_seg'}:
        torch.testing.assert_close(got[key], want[key], rtol=rtol, atol=0)
    torch.testing.assert_close(got['acc_seg'], want['acc_seg'], rtol=0,
                               atol=atol_acc)
    torch.testing.assert_close(got_grad, want_grad, rtol=rtol,
                               atol=rtol * want_grad.abs().max().item())


# loss_decode, align_corners, logits (h, w), labels (H, W): one band row is
# 2 * 5 * W * 8 bytes, the bands 3 rows, which divides none of the heights
CASES = [
    (ce(), False, (8, 9), (61, 67)),
    (ce(avg_non_ignore=True), True, (8, 9), (61, 67)),
    (ce(avg_non_ignore=True, loss_weight=0.4), False, (7, 7), (50, 50)),
    ([ce(loss_weight=0.4), ce(avg_non_ignore=True),
      ce(loss_weight=2.0, loss_name='loss_other')], True, (6, 10), (44, 83)),
    # labels smaller than the logits, and the same size
    (ce(), False, (20, 16), (13, 11)),
    (ce(avg_non_ignore=True), True, (12, 12), (12, 12)),
]


@pytest.mark.parametrize('loss_decode, align_corners, size, label_size',
                         CASES)
def test_same_as_mmseg_float64(loss_decode, align_corners, size, label_size):
    torch.manual_seed(0)
    head = build_head(loss_decode, align_corners=align_corners)
    logits = torch.randn(2, 5, *size, dtype=torch.float64)
    labels = random_labels((2, *label_size), 5)
    compare(head, logits, labels, band_bytes=2 * 5 * label_size[1] * 8 * 3,
            rtol=1e-10)


@pytest.mark.parametrize('avg_non_ignore', [False, True])
def test_class_weight_same_as_mmseg(avg_non_ignore):
    # MMSeg 1.x divides by the sum of the pixels' class weights and looks
    # them up for the ignored label too: with an ignore_index that is a class
    # index, ignored pixels count in the divisor unless avg_non_ignore
    weight = [0.5, 1.0, 2.0, 1.5, 0.25]
    head = build_head([ce(class_weight=weight, avg_non_ignore=avg_non_ignore),
                       ce(loss_weight=0.5)], ignore_index=1)
    logits = torch.randn(2, 5, 8, 9, dtype=torch.float64)
    compare(head, logits, random_labels((2, 61, 67), 5, ignore_index=1),
            band_bytes=2 * 5 * 67 * 8 * 4, rtol=1e-10)
    # and no ignored pixels with ignore_index 255
    head = build_head(ce(class_weight=weight, avg_non_ignore=avg_non_ignore))
    compare(head, logits, random_labels((2, 61, 67), 5, ignored=0),
            band_bytes=2 * 5 * 67 * 8 * 4, rtol=1e-10)


def test_class_weight_with_ignored_pixels_fails_as_mmseg():
    head = build_head(ce(class_weight=[1.0] * 5, avg_non_ignore=True))
    logits = torch.randn(2, 5, 8, 8)
    data_samples = samples(random_labels((2, 32, 32), 5))
    with pytest.raises(IndexError):
        head.loss_by_feat(logits, data_samples)
    install_lean_loss(head)
    with pytest.raises(IndexError, match='ignore_index 255'):
        head.loss_by_feat(logits, data_samples)


def test_label_out_of_range_fails_as_mmseg():
    head = build_head(ce())
    labels = random_labels((2, 16, 16), 5)
    labels[0, 3, 4] = 7
    with pytest.raises(IndexError):
        head.loss_by_feat(torch.randn(2, 5, 4, 4), samples(labels))
    install_lean_loss(head)
    with pytest.raises(IndexError, match='label 7'):
        head.loss_by_feat(torch.randn(2, 5, 4, 4), samples(labels))


@pytest.mark.parametrize('align_corners', [False, True])
def test_same_as_mmseg_float32(align_corners):
    torch.manual_seed(0)
    head = build_head(ce(avg_non_ignore=True), num_classes=21,
                      align_corners=align_corners)
    logits = torch.randn(2, 21, 32, 32)
    labels = random_labels((2, 256, 256), 21)
    # an upsampled pixel whose two best classes are within rounding may
    # change the accuracy by one pixel's worth
    n_valid = int((labels != 255).sum())
    compare(head, logits, labels, band_bytes=2**20, rtol=1e-5,
            atol_acc=100.0 / n_valid + 1e-5)


def test_all_pixels_ignored():
    head = build_head([ce(), ce(avg_non_ignore=True)])
    logits = torch.randn(2, 5, 4, 4, dtype=torch.float64)
    compare(head, logits, torch.full((2, 16, 16), 255), band_bytes=2**12,
            rtol=1e-10)


def test_ties_pick_the_class_mmseg_picks():
    # equal logits everywhere: topk (MMSeg's accuracy) does not pick class 0
    head = build_head(ce())
    compare(head, torch.zeros(2, 5, 4, 4), random_labels((2, 16, 16), 5),
            band_bytes=2**10, rtol=1e-6)


def test_compact_labels():
    assert compact_labels(torch.tensor([0, 255])).dtype == torch.uint8
    assert compact_labels(torch.tensor([-1, 20])).dtype == torch.int8
    assert compact_labels(torch.tensor([0, 300])).dtype == torch.int16
    assert compact_labels(torch.tensor([-100, 70000])).dtype == torch.int32
    labels = torch.tensor([[3, 255], [0, 1]])
    assert torch.equal(compact_labels(labels).long(), labels)


def saved_bytes(fn, model):
    with SavedTensorMeter(model) as meter:
        fn()
    return meter.total_bytes


def test_saves_only_the_logits_and_compact_labels():
    head = build_head(ce(), num_classes=21)
    logits = torch.randn(2, 21, 32, 32, requires_grad=True)
    data_samples = samples(random_labels((2, 256, 256), 21))
    mmseg = saved_bytes(lambda: head.loss_by_feat(logits, data_samples), head)
    install_lean_loss(head)
    lean = saved_bytes(lambda: head.loss_by_feat(logits, data_samples), head)
    assert lean == logits.numel() * 4 + 2 * 256 * 256  # uint8 labels
    # MMSeg's: full-resolution log-probabilities and int64 labels at least
    assert mmseg > 2 * 21 * 256 * 256 * 4 + 2 * 256 * 256 * 8


def test_peak_memory_lower_than_mmseg():
    head = build_head(ce(avg_non_ignore=True), num_classes=21)
    logits = torch.randn(2, 21, 32, 32, requires_grad=True)
    data_samples = samples(random_labels((2, 256, 256), 21))

    def step():
        head.loss_by_feat(logits, data_samples)['loss_ce'].backward()

    mmseg = peak_memory_bytes(step, torch.device('cpu'))
    install_lean_loss(head, band_bytes=2**20)
    lean = peak_memory_bytes(step, torch.device('cpu'))
    full = 2 * 21 * 256 * 256 * 4  # one full-resolution float32 tensor
    assert mmseg > 2 * full
    # 1 MiB bands: a few of them, the labels and the head-size gradient
    assert lean < full / 2


def test_unsupported_losses_and_heads():
    assert lean_loss_support(build_head(ce())) is None
    assert lean_loss_support(build_head([ce(), ce(loss_weight=0.5)])) is None
    dice = build_head([ce(), dict(type='DiceLoss')])
    assert lean_loss_support(dice) == 'loss_decode DiceLoss is not supported'
    sigmoid = build_head(ce(use_sigmoid=True))
    assert 'use_sigmoid=True' in lean_loss_support(sigmoid)
    assert 'reduction' in lean_loss_support(build_head(ce(reduction='sum')))
    sampler = build_head(ce(), sampler=dict(type='OHEMPixelSampler'))
    assert 'sampler' in lean_loss_support(sampler)
    assert '3 class weights for 5 classes' in lean_loss_support(
        build_head(ce(class_weight=[1.0, 2.0, 3.0])))
    stdc = MODELS.build(dict(
        type='STDCHead', in_channels=4, channels=4, num_convs=1,
        num_classes=2, loss_decode=ce()))
    assert lean_loss_support(stdc) == 'STDCHead has its own loss_by_feat'
    assert lean_loss_support(nn.Conv2d(1, 1, 1)) == (
        'Conv2d is not a BaseDecodeHead')
    with pytest.raises(ValueError, match='DiceLoss is not supported'):
        install_lean_loss(dice)
    assert 'loss_by_feat' not in vars(dice)


def test_install_is_per_instance_and_survives_copies():
    head, other = build_head(ce()), build_head(ce())
    install_lean_loss(head)
    assert 'loss_by_feat' in vars(head) and 'loss_by_feat' not in vars(other)
    logits = torch.randn(2, 5, 4, 4)
    data_samples = samples(random_labels((2, 16, 16), 5))
    want = other.loss_by_feat(logits, data_samples)['loss_ce']
    for copied in (copy.deepcopy(head), pickle.loads(pickle.dumps(head))):
        # bound to the copy, not to the original
        assert copied.loss_by_feat.args[0] is copied
        got = copied.loss_by_feat(logits, data_samples)['loss_ce']
        torch.testing.assert_close(got, want)
    remove_lean_loss(head)
    assert 'loss_by_feat' not in vars(head)
    remove_lean_loss(head)  # not lean: nothing to do


def test_functional_checks_its_arguments():
    with pytest.raises(ValueError, match='expected'):
        lean_seg_loss(torch.randn(2, 5, 4, 4), torch.zeros(3, 8, 8).long(),
                      [CETerm()])
    with pytest.raises(ValueError, match='terms'):
        lean_seg_loss(torch.randn(2, 5, 4, 4), torch.zeros(2, 8, 8).long(),
                      [])


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_same_as_mmseg_cuda():
    head = build_head([ce(avg_non_ignore=True), ce(loss_weight=0.5)],
                      num_classes=21).cuda()
    logits = torch.randn(2, 21, 32, 32, device='cuda')
    labels = random_labels((2, 256, 256), 21).cuda()
    n_valid = int((labels != 255).sum())
    compare(head, logits, labels, band_bytes=2**20, rtol=1e-5,
            atol_acc=100.0 / n_valid + 1e-5)

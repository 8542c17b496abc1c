"""Handwritten digits composited on canvases: an offline segmentation demo."""
import os
import os.path as osp
from typing import Dict, List, Optional

import numpy as np
from mmseg.datasets import BaseSegDataset
from mmseg.registry import DATASETS
from PIL import Image

#: Splits written by :func:`make_digits_seg`: (domain, number of canvases).
DIGITS_SEG_SPLITS: Dict[str, tuple] = {
    'train': ('source', 800),
    'val': ('source', 100),
    'shift_train': ('target', 300),
    'shift_val': ('target', 100),
}
#: The converter that writes the data, a script of the repository.
CONVERTER = osp.join(
    osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))), 'tools',
    'dataset_converters', 'digits_seg.py')


def make_command() -> str:
    """The converter's command line as typed in the working directory: its
    path relative to it when it lies under it, else absolute."""
    relative = osp.relpath(CONVERTER)
    return 'python ' + (CONVERTER if relative.startswith(os.pardir) else
                        relative)


@DATASETS.register_module()
class DigitsSegDataset(BaseSegDataset):
    """scikit-learn's handwritten digits on canvases, with per-pixel labels.

    Class 0 is the background and class ``k + 1`` the digit ``k``. The data
    is written by :func:`make_digits_seg` (``tools/dataset_converters/
    digits_seg.py``) in MMSeg's usual layout: ``img_dir/<split>/*.png`` and
    ``ann_dir/<split>/*.png``.

    Args:
        img_suffix (str): Suffix of images. Defaults to '.png'.
        seg_map_suffix (str): Suffix of label maps. Defaults to '.png'.
        **kwargs: Other arguments of :class:`mmseg.datasets.BaseSegDataset`.
    """

    METAINFO = dict(
        classes=('background', *(str(k) for k in range(10))),
        palette=[[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25],
                 [0, 130, 200], [245, 130, 48], [145, 30, 180],
                 [70, 240, 240], [240, 50, 230], [210, 245, 60],
                 [250, 190, 212]])

    def __init__(self,
                 img_suffix: str = '.png',
                 seg_map_suffix: str = '.png',
                 **kwargs) -> None:
        super().__init__(
            img_suffix=img_suffix, seg_map_suffix=seg_map_suffix, **kwargs)

    def load_data_list(self) -> List[dict]:
        """Load the file list; a missing folder says how to make the data."""
        for key in ('img_path', 'seg_map_path'):
            folder = self.data_prefix.get(key)
            if folder and not osp.isdir(folder):
                raise FileNotFoundError(
                    f'DigitsSegDataset: "{folder}" does not exist. Build the '
                    f'demo data (offline, seconds) with `{make_command()} '
                    f'{self.data_root or "<data_root>"}`.')
        return super().load_data_list()


def _render(digit: np.ndarray, size: int) -> np.ndarray:
    """An 8x8 digit (values 0..16) resized to ``size`` pixels, in [0, 1]."""
    img = Image.fromarray((digit * (255 / 16)).astype(np.uint8))
    return np.asarray(img.resize((size, size), Image.BILINEAR)) / 255.0


def _background(rng: np.random.Generator, size: int, domain: str) -> np.ndarray:
    """An RGB canvas in [0, 1]: dark and plain (source) or brighter and
    tinted with smooth colour stains (target)."""
    if domain == 'source':
        return np.full((size, size, 3), rng.uniform(0.0, 0.15))
    coarse = rng.uniform(0.1, 0.5, (4, 4, 3))
    stains = np.stack([
        np.asarray(Image.fromarray((coarse[..., c] * 255).astype(np.uint8))
                   .resize((size, size), Image.BICUBIC)) / 255.0
        for c in range(3)], axis=-1)
    return stains


def make_canvas(rng: np.random.Generator, images: np.ndarray,
                labels: np.ndarray, domain: str, size: int = 64,
                max_digits: int = 3) -> tuple:
    """Composite 1 to ``max_digits`` digits on one canvas.

    Returns:
        tuple: ``(image, label)``: an HxWx3 uint8 RGB image and an HxW uint8
        label map (0 background, ``k + 1`` digit ``k``).
    """
    canvas = _background(rng, size, domain)
    label = np.zeros((size, size), np.uint8)
    for _ in range(rng.integers(1, max_digits + 1)):
        idx = rng.integers(len(images))
        side = int(rng.integers(size // 3, size // 2 + 1))
        y, x = rng.integers(0, size - side + 1, 2)
        alpha = _render(images[idx], side)[..., None]
        if domain == 'source':
            ink = np.full(3, rng.uniform(0.8, 1.0))
        else:
            ink = rng.uniform(0.6, 1.0, 3)
        patch = canvas[y:y + side, x:x + side]
        canvas[y:y + side, x:x + side] = patch * (1 - alpha) + ink * alpha
        label[y:y + side, x:x + side][alpha[..., 0] > 0.4] = labels[idx] + 1
    noise = 0.03 if domain == 'source' else 0.08
    canvas = canvas + rng.normal(0, noise, canvas.shape)
    return (np.clip(canvas, 0, 1) * 255).round().astype(np.uint8), label


def make_digits_seg(data_root: str,
                    seed: int = 0,
                    size: int = 64,
                    splits: Optional[Dict[str, tuple]] = None) -> Dict[str, int]:
    """Write the digits segmentation demo data under ``data_root``.

    The 1797 scans of ``sklearn.datasets.load_digits`` are split in halves by
    a seeded permutation: the source domain (white digits on plain dark
    canvases: ``train``, ``val``) uses one half and the target domain
    (colour-tinted digits on brighter canvases with colour stains, lower
    contrast, more noise: ``shift_train``, ``shift_val``) the other, so no
    scan appears in both. Within a domain,
    train and val canvases draw from the same scans. The output depends only
    on the arguments.

    Args:
        data_root (str): Output folder (``img_dir/`` and ``ann_dir/``).
        seed (int): Seed of every random choice. Defaults to 0.
        size (int): Canvas side in pixels. Defaults to 64.
        splits (dict[str, tuple], optional): ``{split: (domain, number)}``
            with domain 'source' or 'target'. Defaults to
            :data:`DIGITS_SEG_SPLITS`.

    Returns:
        dict[str, int]: Number of canvases written per split.
    """
    from sklearn.datasets import load_digits
    digits = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.images))
    halves = dict(source=order[:len(order) // 2],
                  target=order[len(order) // 2:])
    counts = {}
    for split, (domain, num) in (splits or DIGITS_SEG_SPLITS).items():
        pick = halves[domain]
        img_dir = osp.join(data_root, 'img_dir', split)
        ann_dir = osp.join(data_root, 'ann_dir', split)
        os.makedirs(img_dir, exist_ok=True)
        os.makedirs(ann_dir, exist_ok=True)
        for i in range(num):
            img, label = make_canvas(rng, digits.images[pick],
                                     digits.target[pick], domain, size)
            Image.fromarray(img).save(osp.join(img_dir, f'{i:05d}.png'))
            Image.fromarray(label).save(osp.join(ann_dir, f'{i:05d}.png'))
        counts[split] = num
    return counts

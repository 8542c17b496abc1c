"""scikit-learn's handwritten digits, upsampled: an offline demo dataset."""
from typing import List

import numpy as np
import torch
import torch.nn.functional as F
from mmpretrain.datasets import BaseDataset
from mmpretrain.registry import DATASETS


@DATASETS.register_module()
class Digits(BaseDataset):
    """The 1797 8x8 digits of ``sklearn.datasets.load_digits`` as RGB images.

    Images are upsampled bilinearly to ``img_size`` and scaled to uint8, so
    MMPretrain's CIFAR pipelines apply. The data ships with scikit-learn: no
    download. A seeded permutation, stratified per class, puts ``test_ratio``
    of each class in the test split.

    Args:
        split (str): 'train' or 'test'. Defaults to 'train'.
        img_size (int): Side of the upsampled images. Defaults to 32.
        test_ratio (float): Fraction of each class in the test split.
            Defaults to 0.25.
        seed (int): Seed of the split. Defaults to 0.
        **kwargs: Other arguments of :class:`mmpretrain.datasets.BaseDataset`.
    """

    METAINFO = {'classes': tuple(str(i) for i in range(10))}

    def __init__(self,
                 split: str = 'train',
                 img_size: int = 32,
                 test_ratio: float = 0.25,
                 seed: int = 0,
                 **kwargs) -> None:
        if split not in ('train', 'test'):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        self.split = split
        self.img_size = img_size
        self.test_ratio = test_ratio
        self.seed = seed
        super().__init__(ann_file='', **kwargs)

    def load_data_list(self) -> List[dict]:
        """Load, split and upsample the digits."""
        from sklearn.datasets import load_digits
        images, labels = load_digits(return_X_y=True)
        rng = np.random.default_rng(self.seed)
        test = np.zeros(len(labels), dtype=bool)
        for label in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == label))
            test[members[:round(self.test_ratio * len(members))]] = True
        keep = np.flatnonzero(test if self.split == 'test' else ~test)
        pixels = torch.from_numpy(images[keep]).float().view(-1, 1, 8, 8)
        pixels = F.interpolate(pixels * (255 / 16), size=self.img_size,
                               mode='bilinear', align_corners=False)
        imgs = pixels.round().clamp(0, 255).to(torch.uint8).expand(
            -1, 3, -1, -1).permute(0, 2, 3, 1).numpy()
        return [dict(img=np.ascontiguousarray(img), gt_label=int(label))
                for img, label in zip(imgs, labels[keep])]

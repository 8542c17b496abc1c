"""One user's non-IID partition of a classification dataset."""
import copy
import os.path as osp
from typing import Optional, Union

import numpy as np
from mmengine.dataset import BaseDataset, force_full_init
from mmpretrain.registry import DATASETS


def make_user_split(labels: np.ndarray,
                    num_partitions: int = 2,
                    shards_per_partition: int = 2,
                    seed: int = 0) -> np.ndarray:
    """Split samples into non-IID partitions of label-sorted shards.

    The samples, sorted by label (stable), are cut into
    ``num_partitions * shards_per_partition`` contiguous shards of equal size
    (up to one sample); a seeded permutation deals ``shards_per_partition``
    shards to each partition.

    Args:
        labels (np.ndarray): Label of each sample, shape (N, ).
        num_partitions (int): Number of partitions. Defaults to 2.
        shards_per_partition (int): Shards per partition. Defaults to 2.
        seed (int): Seed of the shard permutation. Defaults to 0.

    Returns:
        np.ndarray: Partition id of each sample, shape (N, ).
    """
    if num_partitions < 1 or shards_per_partition < 1:
        raise ValueError('num_partitions and shards_per_partition must be '
                         f'>= 1, got {num_partitions}, {shards_per_partition}')
    labels = np.asarray(labels)
    num_shards = num_partitions * shards_per_partition
    shards = np.array_split(np.argsort(labels, kind='stable'), num_shards)
    order = np.random.default_rng(seed).permutation(num_shards)
    partition_of = np.empty(len(labels), dtype=np.int64)
    for rank, shard in enumerate(order):
        partition_of[shards[shard]] = rank // shards_per_partition
    return partition_of


@DATASETS.register_module()
class UserSplitDataset:
    """The samples of one partition (one "user") of a dataset.

    Reproduces the on-device setting of gradient filtering: the training set
    is split into non-IID partitions of label-sorted shards; partition 0
    pretrains the model and partition 1 is the data it is fine-tuned on. The
    split comes from ``index_file`` (a ``.npy`` array holding the partition
    id of every sample of ``dataset``) or, without one, from
    :func:`make_user_split` with ``seed``, so every run and every process gets
    the same partitions.

    Args:
        dataset (BaseDataset | dict): The dataset to split (single-label).
        partition (int): Partition to serve. Defaults to 1.
        num_partitions (int): Number of partitions. Defaults to 2.
        shards_per_partition (int): Label-sorted shards per partition.
            Defaults to 2.
        seed (int): Seed of the split when there is no ``index_file``.
            Defaults to 0.
        index_file (str, optional): ``.npy`` file with the partition id of
            each sample. Defaults to None.
        lazy_init (bool): Split on first use instead of at construction.
            Defaults to False.
    """

    def __init__(self,
                 dataset: Union[BaseDataset, dict],
                 partition: int = 1,
                 num_partitions: int = 2,
                 shards_per_partition: int = 2,
                 seed: int = 0,
                 index_file: Optional[str] = None,
                 lazy_init: bool = False) -> None:
        self.dataset = (DATASETS.build(dataset)
                        if isinstance(dataset, dict) else dataset)
        if not 0 <= partition < num_partitions:
            raise ValueError(f'partition must be in [0, {num_partitions}), '
                             f'got {partition}')
        if index_file is not None and not osp.isfile(index_file):
            raise FileNotFoundError(
                f'user split index file "{index_file}" not found; save one '
                'with np.save(path, make_user_split(labels, ...)) or set '
                'index_file=None to build the split from `seed`')
        self.partition = partition
        self.num_partitions = num_partitions
        self.shards_per_partition = shards_per_partition
        self.seed = seed
        self.index_file = index_file
        self._metainfo = self.dataset.metainfo
        self._fully_initialized = False
        if not lazy_init:
            self.full_init()

    @property
    def metainfo(self) -> dict:
        """Meta information of the wrapped dataset."""
        return copy.deepcopy(self._metainfo)

    def full_init(self) -> None:
        """Load the wrapped dataset and pick this partition's samples."""
        if self._fully_initialized:
            return
        self.dataset.full_init()
        num_samples = len(self.dataset)
        if self.index_file is None:
            partition_of = make_user_split(
                self.dataset.get_gt_labels(), self.num_partitions,
                self.shards_per_partition, self.seed)
        else:
            partition_of = np.load(self.index_file)
            if partition_of.shape != (num_samples, ):
                raise ValueError(
                    f'{self.index_file} holds an array of shape '
                    f'{partition_of.shape}; expected one partition id per '
                    f'sample, shape ({num_samples}, )')
        self.indices = np.flatnonzero(partition_of == self.partition)
        if len(self.indices) == 0:
            raise ValueError(f'partition {self.partition} is empty')
        self._fully_initialized = True

    @force_full_init
    def get_data_info(self, idx: int) -> dict:
        """The annotation of the ``idx``-th sample of this partition."""
        return self.dataset.get_data_info(int(self.indices[idx]))

    @force_full_init
    def get_cat_ids(self, idx: int) -> list:
        """The category ids of the ``idx``-th sample of this partition."""
        return self.dataset.get_cat_ids(int(self.indices[idx]))

    @force_full_init
    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, idx: int) -> dict:
        if not self._fully_initialized:
            self.full_init()
        return self.dataset[int(self.indices[idx])]

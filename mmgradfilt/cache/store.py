"""A store of per-sample feature entries: RAM up to a budget, ``.npy`` maps.

Each frontier tensor is one ``.npy`` file of shape ``(capacity, *shape)``,
read through ``np.memmap`` and written with ``os.pwrite``: rows are written
and read one at a time, the format is standard and describes itself, and
reads copy nothing until a row is used. Safetensors files cannot be changed
once written, and LMDB adds a dependency and a single-writer lock.
"""
import glob
import json
import logging
import math
import os
import os.path as osp
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import psutil
import torch
from mmengine.logging import print_log

#: Version of the layout written in ``manifest.json``.
FORMAT_VERSION = 1
#: Stored dtypes: name -> numpy dtype of the data files.
DTYPES = {'float16': np.float16, 'float32': np.float32, 'int8': np.int8}
MANIFEST = 'manifest.json'
VALID = 'valid.npy'
MB = 2.0**20

Spec = Tuple[Tuple[int, ...], torch.dtype]


def _log(msg: str, level: int = logging.INFO) -> None:
    print_log(msg, logger='current', level=level)


def _pwrite(fd: int, data: np.ndarray, offset: int) -> None:
    """Write all bytes of ``data`` at ``offset`` (``pwrite`` may write
    fewer)."""
    view = memoryview(np.ascontiguousarray(data)).cast('B')
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def check_storage(dtype: str, max_memory_mb: Optional[float],
                  max_disk_mb: Optional[float]) -> None:
    """A ``ValueError`` or ``TypeError`` naming the bad value unless ``dtype``
    is a storage dtype and each bound is a positive number or None."""
    if dtype not in DTYPES:
        raise ValueError(f'dtype must be one of {tuple(DTYPES)}, '
                         f'got {dtype!r}')
    for name, value in (('max_memory_mb', max_memory_mb),
                        ('max_disk_mb', max_disk_mb)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f'{name} must be a number or None, got {value!r}')
        if not value > 0:
            raise ValueError(f'{name} must be > 0, got {value!r}')


def check_writable(root: str) -> None:
    """Create ``root`` if needed and write a probe file there; a
    ``ValueError`` naming it and why when that fails."""
    try:
        os.makedirs(root, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix='.write_probe'):
            pass
    except OSError as exc:
        raise ValueError(
            f'cache_dir {root!r} cannot be written: {exc}') from exc


class FeatureStore:
    """Fixed-size per-sample entries, valid only once fully written.

    Entry ``i`` holds one tensor per spec. Files under ``root``:
    ``frontier_<j>.npy`` (``(capacity, *shape_j)`` in the stored dtype),
    ``frontier_<j>_scale.npy`` for int8 (``(capacity, C_j)`` float32
    symmetric scales, one per channel: dim 0 of the per-sample tensor),
    ``valid.npy`` (uint8 flags) and ``manifest.json`` (key, specs, dtype,
    capacity), written last and atomically. A store whose manifest matches
    is reused with its valid entries (a killed run that resumes keeps them);
    any other one under ``root`` is removed and rebuilt, with a log line
    saying why.

    ``put`` writes the data, then the valid flag: a reader never sees a
    partial entry. Without ``fsync`` an entry survives a killed process (the
    kernel's page cache holds the writes) but not a crash of the machine;
    with it, the data reach the disk before the flag is set. A failed write
    (a full disk, a quota) leaves the entry invalid and stops all later
    writes of this process; ``max_disk_mb`` refuses entries beyond the bound.
    Both are logged once and ``put`` returns False: the caller computes
    those entries as without a cache.

    Entries are also kept in RAM (stored dtype) while the RAM tier stays
    within ``max_memory_mb``; ``get`` reads RAM first, then the files, and
    returns each tensor in its spec's dtype (int8 dequantised).

    Processes (DDP ranks) may write disjoint entries of one store at the same
    time and read each other's: one process builds the store with
    ``create=True``, the others open it with ``create=False`` after a
    barrier. ``contains`` reads the flags from the file. Each process has its
    own RAM tier and counts its own failures.

    Args:
        root (str): Folder of the files (made if missing).
        key (dict): What the entries depend on (JSON-serialisable); another
            key rebuilds the store.
        specs (Sequence[tuple]): ``(shape, dtype)`` of each per-sample
            tensor; dtypes floating.
        capacity (int): Number of entries (sample and view codes).
        dtype (str): Stored dtype: 'float16', 'float32' or 'int8'.
            Defaults to 'float16'.
        max_memory_mb (float, optional): RAM tier bound. Defaults to None:
            a quarter of the memory available at construction.
        max_disk_mb (float, optional): Bound of the valid entries' bytes on
            disk. Defaults to None: no bound.
        create (bool): Build (or rebuild) the store when the files do not
            match; False opens an existing matching store and raises
            otherwise. Defaults to True.
        fsync (bool): Sync the data before setting a valid flag.
            Defaults to False.
    """

    def __init__(self,
                 root: str,
                 key: dict,
                 specs: Sequence[Spec],
                 capacity: int,
                 dtype: str = 'float16',
                 max_memory_mb: Optional[float] = None,
                 max_disk_mb: Optional[float] = None,
                 create: bool = True,
                 fsync: bool = False) -> None:
        check_storage(dtype, max_memory_mb, max_disk_mb)
        if isinstance(capacity, bool) or not isinstance(capacity, int):
            raise TypeError(f'capacity must be an int, got {capacity!r}')
        if capacity < 1:
            raise ValueError(f'capacity must be >= 1, got {capacity}')
        if not isinstance(key, dict):
            raise TypeError(f'key must be a dict, got {key!r}')
        try:
            self._key = json.loads(json.dumps(key, sort_keys=True))
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f'key must be JSON-serialisable, got {key!r}: {exc}') from exc
        self._specs = self._check_specs(specs)
        check_writable(root)
        self.root = root
        self.dtype = dtype
        self.max_disk_mb = max_disk_mb
        self.fsync = fsync
        self._capacity = capacity
        # columns: (file name, per-row shape, numpy dtype)
        self._columns: List[Tuple[str, Tuple[int, ...], np.dtype]] = []
        for j, (shape, _) in enumerate(self._specs):
            self._columns.append(
                (f'frontier_{j}.npy', shape, np.dtype(DTYPES[dtype])))
            if dtype == 'int8':
                self._columns.append((f'frontier_{j}_scale.npy',
                                      (shape[0] if shape else 1, ),
                                      np.dtype(np.float32)))
        self._row_bytes = [
            math.prod(shape) * np.dtype(npdtype).itemsize
            for _, shape, npdtype in self._columns
        ]
        self._pid: Optional[int] = None
        self._fds: List[int] = []
        self._maps: List[np.memmap] = []
        self._valid_map: Optional[np.memmap] = None
        self.rebuilt = False
        self._open_or_build(create)
        if max_memory_mb is None:
            available = psutil.virtual_memory().available / MB
            max_memory_mb = available / 4
            _log(f'FeatureStore: RAM tier up to {max_memory_mb:.0f} MB, '
                 f'a quarter of the {available:.0f} MB available')
        self.max_memory_mb = max_memory_mb
        self._ram: Dict[int, List[torch.Tensor]] = {}
        self._ram_bytes = 0
        self._known_valid = set()
        self._write_failed = False
        self._disk_refused = False

    @staticmethod
    def _check_specs(specs: Sequence[Spec]) -> List[Spec]:
        checked = []
        for spec in specs:
            try:
                shape, dtype = spec
                shape = tuple(int(s) for s in shape)
            except (TypeError, ValueError) as exc:
                raise TypeError('each spec must be (shape, torch.dtype), got '
                                f'{spec!r}') from exc
            if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
                raise TypeError(
                    f'spec dtypes must be floating torch dtypes, got {spec!r}')
            if any(s < 1 for s in shape):
                raise ValueError(f'spec shapes must be positive, got {spec!r}')
            checked.append((shape, dtype))
        if not checked:
            raise ValueError('specs must name at least one tensor, got '
                             f'{specs!r}')
        return checked

    # ------------------------------------------------------------ layout
    def _manifest(self) -> dict:
        return dict(
            format=FORMAT_VERSION,
            key=self._key,
            specs=[[list(shape), str(dtype).replace('torch.', '')]
                   for shape, dtype in self._specs],
            dtype=self.dtype,
            capacity=self._capacity)

    def _mismatch(self) -> Optional[str]:
        """Why the files under ``root`` cannot be reused, or None."""
        path = osp.join(self.root, MANIFEST)
        if not osp.isfile(path):
            return 'no manifest'
        try:
            with open(path) as f:
                found = json.load(f)
        except (OSError, ValueError) as exc:
            return f'unreadable manifest ({exc})'
        expected = self._manifest()
        if not isinstance(found, dict) or found.get('format') != \
                expected['format']:
            return (f'format {found.get("format")!r}, expected '
                    f'{expected["format"]}' if isinstance(found, dict) else
                    'malformed manifest')
        old_key, new_key = found.get('key') or {}, expected['key']
        fields = sorted(k for k in set(old_key) | set(new_key)
                        if old_key.get(k) != new_key.get(k))
        if fields:
            return f'key field(s) {", ".join(fields)} differ'
        for name in ('specs', 'dtype', 'capacity'):
            if found.get(name) != expected[name]:
                return f'{name} {found.get(name)!r} != {expected[name]!r}'
        for name, shape, npdtype in self._columns + [
                (VALID, (), np.dtype(np.uint8))]:
            try:
                array = np.load(osp.join(self.root, name), mmap_mode='r')
            except (OSError, ValueError) as exc:
                return f'{name} unreadable ({exc})'
            if array.shape != (self._capacity, *shape) or \
                    array.dtype != npdtype:
                return f'{name} holds {array.dtype}{list(array.shape)}'
        return None

    def _open_or_build(self, create: bool) -> None:
        reason = self._mismatch()
        if reason is None:
            _log(f'FeatureStore: reusing {self.root}: {self.num_entries} '
                 f'valid entries of {self._capacity}')
            return
        if not create:
            raise RuntimeError(
                f'FeatureStore at {self.root!r} cannot be opened ({reason}); '
                'the process with create=True builds it first')
        old = [
            path for pattern in (MANIFEST, f'{MANIFEST}.tmp*',
                                 'frontier_*.npy', VALID)
            for path in glob.glob(osp.join(self.root, pattern))
        ]
        if old:
            self.rebuilt = True
            _log(f'FeatureStore: rebuilding {self.root}: {reason}',
                 logging.WARNING)
        # the manifest first: a store interrupted from here on is not reused
        for path in sorted(old, key=lambda p: not p.endswith(MANIFEST)):
            os.remove(path)
        for name, shape, npdtype in self._columns + [
                (VALID, (), np.dtype(np.uint8))]:
            np.lib.format.open_memmap(
                osp.join(self.root, name),
                mode='w+',
                dtype=npdtype,
                shape=(self._capacity, *shape))
        path = osp.join(self.root, MANIFEST)
        tmp = f'{path}.tmp{os.getpid()}'
        with open(tmp, 'w') as f:
            json.dump(self._manifest(), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if not old:
            _log(f'FeatureStore: new store at {self.root}: '
                 f'{self._capacity} entries of '
                 f'{self.bytes_per_entry / MB:.3f} MB ({self.dtype})')

    def _process_files(self) -> None:
        """Open the files in this process (again after a fork)."""
        if self._pid == os.getpid():
            return
        self._pid = os.getpid()
        self._fds = []
        self._maps = []
        for name, _, _ in self._columns + [(VALID, None, None)]:
            path = osp.join(self.root, name)
            array = np.load(path, mmap_mode='r')
            self._maps.append(array)
            self._fds.append(os.open(path, os.O_RDWR))
        self._valid_map = self._maps.pop()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_pid=None, _fds=[], _maps=[], _valid_map=None)
        return state

    def close(self) -> None:
        """Close this process's files (they reopen on the next use)."""
        if self._pid == os.getpid():
            for fd in self._fds:
                os.close(fd)
        self._pid, self._fds, self._maps = None, [], []
        self._valid_map = None

    def __del__(self) -> None:
        if getattr(self, '_pid', None) is not None:
            self.close()

    # ------------------------------------------------------------ entries
    @property
    def capacity(self) -> int:
        """Number of entries the store can hold."""
        return self._capacity

    @property
    def specs(self) -> List[Spec]:
        """``(shape, dtype)`` of each per-sample tensor."""
        return list(self._specs)

    @property
    def bytes_per_entry(self) -> int:
        """Bytes of one entry as stored (int8 scales included)."""
        return sum(self._row_bytes)

    @property
    def ram_bytes(self) -> int:
        """Bytes of the entries held in this process's RAM tier."""
        return self._ram_bytes

    @property
    def num_entries(self) -> int:
        """Number of valid entries, those of every process."""
        self._process_files()
        return int(np.count_nonzero(self._valid_map))

    @property
    def disk_bytes(self) -> int:
        """Bytes of the valid entries on disk."""
        return self.num_entries * self.bytes_per_entry

    def _check_index(self, index: int) -> int:
        if not 0 <= int(index) < self._capacity:
            raise IndexError(
                f'entry {index} out of range [0, {self._capacity})')
        return int(index)

    def contains(self, index: int) -> bool:
        """Whether entry ``index`` is valid (written by any process)."""
        index = self._check_index(index)
        if index in self._known_valid:
            return True
        self._process_files()
        if self._valid_map[index]:
            self._known_valid.add(index)
            return True
        return False

    def _encode(self, tensors: Sequence[torch.Tensor]) -> List[np.ndarray]:
        """The rows of each column, in the stored dtype."""
        if len(tensors) != len(self._specs):
            raise ValueError(f'expected {len(self._specs)} tensors, got '
                             f'{len(tensors)}')
        rows = []
        for j, (tensor, (shape, dtype)) in enumerate(zip(tensors,
                                                         self._specs)):
            if tuple(tensor.shape) != shape or tensor.dtype != dtype:
                raise ValueError(
                    f'tensor {j} is {tensor.dtype}{list(tensor.shape)}, the '
                    f'spec {dtype}{list(shape)}')
            tensor = tensor.detach().cpu()
            if self.dtype != 'int8':
                rows.append(tensor.to(getattr(torch, self.dtype)).numpy())
                continue
            channels = tensor.float().reshape(shape[0] if shape else 1, -1)
            scale = channels.abs().amax(1) / 127
            safe = torch.where(scale > 0, scale, torch.ones_like(scale))
            quant = torch.round(channels / safe[:, None]).clamp(-127, 127)
            rows += [quant.to(torch.int8).reshape(shape).numpy(),
                     scale.numpy()]
        return rows

    def _decode(self, columns: List[torch.Tensor]) -> List[torch.Tensor]:
        """Batched stored columns to the specs' dtypes."""
        out, columns = [], iter(columns)
        for _, dtype in self._specs:
            data = next(columns)
            if self.dtype == 'int8':
                scale = next(columns)
                data = (data.float().reshape(*scale.shape, -1) *
                        scale[..., None]).reshape(data.shape)
            out.append(data.to(dtype))
        return out

    def _keep_in_ram(self, index: int, rows: List[torch.Tensor]) -> None:
        if index in self._ram or (self._ram_bytes + self.bytes_per_entry >
                                  self.max_memory_mb * MB):
            return
        self._ram[index] = [row.clone() for row in rows]
        self._ram_bytes += self.bytes_per_entry

    def put(self, index: int, tensors: Sequence[torch.Tensor]) -> bool:
        """Write entry ``index``: the data first, the valid flag last.

        An entry already valid is kept as it is (entries are written once).

        Args:
            index (int): Entry to write.
            tensors (Sequence[Tensor]): One per-sample tensor per spec.

        Returns:
            bool: Whether the entry is valid now; False when the disk bound
            refused it or a write failed (logged once).
        """
        index = self._check_index(index)
        rows = self._encode(tensors)
        if self.contains(index):
            return True
        if self._write_failed or self._disk_refused:
            return False
        if self.max_disk_mb is not None and (
                self.disk_bytes + self.bytes_per_entry >
                self.max_disk_mb * MB):
            self._disk_refused = True
            _log(f'FeatureStore: {self.root} reached max_disk_mb='
                 f'{self.max_disk_mb} ({self.num_entries} entries); the '
                 'entries not yet stored are computed without a cache',
                 logging.WARNING)
            return False
        self._process_files()
        offsets = [m.offset for m in self._maps]
        try:
            for fd, row, offset, size in zip(self._fds, rows, offsets,
                                             self._row_bytes):
                _pwrite(fd, row, offset + index * size)
            if self.fsync:
                for fd in self._fds[:-1]:
                    os.fsync(fd)
            _pwrite(self._fds[-1], np.ones(1, np.uint8),
                    self._valid_map.offset + index)
        except OSError as exc:
            self._write_failed = True
            _log(f'FeatureStore: writing entry {index} under {self.root} '
                 f'failed ({exc}); the run goes on without caching the '
                 'entries not yet stored (valid entries are kept)',
                 logging.WARNING)
            return False
        self._known_valid.add(index)
        self._keep_in_ram(index, [torch.from_numpy(row) for row in rows])
        return True

    def get_batch(self, indices: Sequence[int]) -> List[torch.Tensor]:
        """Valid entries stacked: one ``(len(indices), *shape)`` tensor per
        spec, in its dtype.

        Raises:
            KeyError: If an entry is not valid.
        """
        indices = [self._check_index(i) for i in indices]
        missing = [
            i for i in indices if i not in self._ram and not self.contains(i)
        ]
        if missing:
            raise KeyError(f'entries {missing} are not valid in {self.root}')
        rows = {i: self._ram[i] for i in indices if i in self._ram}
        on_disk = sorted(set(indices) - set(rows))
        if on_disk:
            self._process_files()
            columns = [torch.from_numpy(np.asarray(m[on_disk]))
                       for m in self._maps]
            for k, index in enumerate(on_disk):
                rows[index] = [column[k] for column in columns]
                self._keep_in_ram(index, rows[index])
        return self._decode([
            torch.stack([rows[i][c] for i in indices])
            for c in range(len(self._columns))
        ])

    def get(self, index: int) -> List[torch.Tensor]:
        """Valid entry ``index``: one tensor per spec, in its dtype.

        Raises:
            KeyError: If the entry is not valid.
        """
        return [tensor[0] for tensor in self.get_batch([index])]

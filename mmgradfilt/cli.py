"""Command-line pieces shared by ``tools/train.py``, ``test.py``,
``benchmark.py`` and ``grad_fidelity.py``: the usual OpenMMLab options and how
they apply to a config."""
import argparse
import os
import os.path as osp
import warnings

import torch
from mmengine.config import Config, DictAction
from mmengine.registry import RUNNERS
from mmengine.runner import Runner


# (message, category, module) of the warnings third-party code prints on
# every run of a tool, none of which is about the run: setuptools deprecates
# pkg_resources, which MMEngine imports and reloads (importlib then raises it)
# to find MMSeg's and MMPretrain's configs; MMSeg's model builder warns that
# it will be deprecated and its cross-entropy loss that a default is a
# default
THIRD_PARTY_WARNINGS = [
    ('pkg_resources is deprecated as an API', UserWarning,
     r'(mmengine\.utils\.package_utils|importlib)$'),
    ('``build_loss`` would be deprecated soon', UserWarning,
     r'mmseg\.models\.builder$'),
    ('Default ``avg_non_ignore`` is False', UserWarning,
     r'mmseg\.models\.losses\.cross_entropy_loss$'),
]


def quiet_third_party() -> None:
    """Silence what third-party code prints on every run of a tool and that
    says nothing about it; call first in ``main()``.

    The warnings of :data:`THIRD_PARTY_WARNINGS`, and kineto's log (the
    library behind ``torch.profiler``, which the benchmark's CPU peak memory
    and CUDA kernel times use): on each use it logs its start and stop
    (``USDT: ... profiler_start``) and, on a machine without a GPU, that it
    could not count GPUs (``gpuGetDeviceCount failed``). Level 6 is above
    all of kineto's levels (``ENUM_COUNT`` in libkineto's
    ``ILoggerObserver.h``); it is read when the profiler first starts, and a
    ``KINETO_LOG_LEVEL`` already set is kept.
    """
    for message, category, module in THIRD_PARTY_WARNINGS:
        warnings.filterwarnings('ignore', message, category, module)
    os.environ.setdefault('KINETO_LOG_LEVEL', '6')


def add_cfg_options(parser: argparse.ArgumentParser) -> None:
    """``--cfg-options`` with MMEngine's ``DictAction``."""
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override some settings in the used config, the key-value pair '
        'in xxx=yyy format will be merged into config file. If the value to '
        'be overwritten is a list, it should be like key="[a,b]" or key=a,b '
        'It also allows nested list/tuple values, e.g. key="[(a,b),(c,d)]" '
        'Note that the quotation marks are necessary and that no white space '
        'is allowed.')


def check_analysis_args(parser: argparse.ArgumentParser,
                        args: argparse.Namespace) -> None:
    """Checks that ``benchmark.py`` and ``grad_fidelity.py`` share: the
    config (where given) exists, ``--device cuda`` has a device and
    ``--radius`` values (where given) are positive."""
    if args.config is not None and not osp.isfile(args.config):
        parser.error(f'config file {args.config} not found')
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda: no CUDA device is available')
    if args.radius and min(args.radius) < 1:
        parser.error('--radius values must be >= 1')


def add_runner_args(parser: argparse.ArgumentParser, work_dir_help: str) -> None:
    """``--work-dir``, ``--cfg-options``, ``--launcher`` and ``--local-rank``."""
    parser.add_argument('--work-dir', help=work_dir_help)
    add_cfg_options(parser)
    parser.add_argument(
        '--launcher',
        choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none',
        help='job launcher')
    # torch.distributed.launch passes --local-rank (torch>=2.0)
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)


def parse_runner_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse, exporting ``LOCAL_RANK`` for the launcher."""
    args = parser.parse_args()
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def read_config(args: argparse.Namespace) -> Config:
    """``args.config`` with ``--cfg-options`` merged in."""
    cfg = Config.fromfile(args.config)
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    return cfg


def load_config(args: argparse.Namespace) -> Config:
    """The config with the command line applied.

    ``work_dir``: ``--work-dir``, else the config's, else
    ``./work_dirs/<config name>``.
    """
    cfg = read_config(args)
    cfg.launcher = args.launcher
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(args.config))[0])
    return cfg


def build_runner(cfg: Config) -> Runner:
    """The config's runner (``runner_type`` if set, else MMEngine's)."""
    if 'runner_type' in cfg:
        return RUNNERS.build(cfg)
    return Runner.from_cfg(cfg)

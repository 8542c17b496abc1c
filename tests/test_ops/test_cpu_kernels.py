"""The C++ fast path on CPU gives the pure-PyTorch reference's results."""
import os
import os.path as osp
import shutil
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from mmgradfilt.ops import cpu_kernels, grad_filter_conv2d
from mmgradfilt.ops import reference
from op_cases import OP_CASES, OP_SIZES

needs_kernels = pytest.mark.skipif(
    not cpu_kernels.available(torch.zeros(1, 1, 1, 1)),
    reason='the C++ kernels could not be compiled here')

SIZES = [(16, 16), (17, 23), (3, 5), (64, 61)]
# (5, 5): a runtime width; (1, 4), (8, 2): radius or stride pairs
BLOCKS = [(2, 2), (4, 4), (3, 6), (8, 8), (5, 5), (1, 4), (8, 2)]


@needs_kernels
@pytest.mark.parametrize('size', SIZES)
@pytest.mark.parametrize('block', BLOCKS)
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32,
                                   torch.bfloat16])
def test_block_reduce_matches_pooling(size, block, dtype):
    x = torch.randn(2, 3, *size, dtype=torch.float64).to(dtype)
    window = tuple(min(b, n) for b, n in zip(block, size))
    ref = x.double()
    want_mean = F.avg_pool2d(ref, window, block, ceil_mode=True)
    want_sum = F.avg_pool2d(ref, window, block, ceil_mode=True,
                            divisor_override=1)
    acc = reference.grid_dtype(dtype)
    got_mean = cpu_kernels.block_reduce(x, block, mean=True, dtype=dtype)
    got_sum = cpu_kernels.block_reduce(x, block, mean=False, dtype=acc)
    assert got_mean.dtype == dtype and got_sum.dtype == acc
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}
    torch.testing.assert_close(got_mean.double(), want_mean, rtol=tol[dtype],
                               atol=tol[dtype])
    torch.testing.assert_close(got_sum.double(), want_sum, rtol=tol[acc],
                               atol=tol[acc] * 10)


@needs_kernels
@pytest.mark.parametrize('size', SIZES)
@pytest.mark.parametrize('block', BLOCKS)
@pytest.mark.parametrize('grid_delta', [0, -1, 1])
@pytest.mark.parametrize('grid_dtype,dtype', [(torch.float64, torch.float64),
                                              (torch.float32, torch.float32),
                                              (torch.float32, torch.float16)])
def test_broadcast_matches_reference(size, block, grid_delta, grid_dtype,
                                     dtype):
    cells = [max(-(-n // b) + grid_delta, 1) for n, b in zip(size, block)]
    grid = torch.randn(2, 3, *cells, dtype=grid_dtype)
    want = reference.broadcast_blocks(grid, block, size, dtype)
    got = cpu_kernels.broadcast_blocks(grid, block, size, dtype)
    assert got.dtype == dtype and got.shape == want.shape
    # the two divide in different orders: a last-bit difference before the
    # cast may round to neighbouring values of the output dtype
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3}
    torch.testing.assert_close(got, want, rtol=tol[dtype], atol=tol[dtype])


@needs_kernels
@pytest.mark.parametrize('kernel', [(3, 3), (5, 5), (1, 3), (7, 7), (2, 4)])
@pytest.mark.parametrize('dims', [(2, 3), (2, ), (3, )])
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32,
                                   torch.bfloat16])
def test_tap_sum_and_repeat(kernel, dims, dtype):
    """Both axes summed (the usual grid kernel) or one (a dilated axis keeps
    its taps, e.g. dilation (1, 8) with radius 4)."""
    weight = torch.randn(6, 4, *kernel, dtype=torch.float64).to(dtype)
    summed = cpu_kernels.sum_taps(weight, dims)
    want = reference.sum_taps(weight.double(), dims)
    assert summed.dtype == dtype and summed.shape == want.shape
    # float32 sums of up to 49 taps round at about 1e-6 of their magnitude
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-2)
    torch.testing.assert_close(summed.double(), want, rtol=tol, atol=tol)
    repeated = cpu_kernels.repeat_taps(summed, weight.shape)
    assert torch.equal(repeated, reference.repeat_taps(summed, weight.shape))


@needs_kernels
def test_repeat_taps_refuses_what_does_not_broadcast():
    with pytest.raises(RuntimeError, match='does not broadcast'):
        cpu_kernels.repeat_taps(torch.zeros(6, 4, 2, 1), (6, 4, 3, 3))


@needs_kernels
@pytest.mark.parametrize('kwargs', OP_CASES)
@pytest.mark.parametrize('size', OP_SIZES)
@pytest.mark.parametrize('threads', [1, 2])
def test_op_same_with_and_without_kernels(monkeypatch, kwargs, size,
                                          threads):
    torch.manual_seed(0)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    groups = kwargs.get('groups', 1)
    x = torch.randn(2, 8, *size, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(8, 8 // groups, 3, 3, dtype=torch.float64,
                         requires_grad=True)
    bias = torch.randn(8, dtype=torch.float64, requires_grad=True)
    grads = []
    try:
        for enabled in (True, False):
            monkeypatch.setattr(cpu_kernels, 'ENABLED', enabled)
            out = grad_filter_conv2d(x, weight, bias, **kwargs)
            grads.append(torch.autograd.grad(out.square().sum(),
                                             (x, weight, bias)))
    finally:
        torch.set_num_threads(old_threads)
    for fast, ref in zip(*grads):
        torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)


@needs_kernels
def test_kernels_take_an_empty_batch():
    x = torch.randn(0, 3, 8, 8)
    for mean in (True, False):
        out = cpu_kernels.block_reduce(x, (4, 2), mean, torch.float32)
        assert out.shape == (0, 3, 2, 4)
    grid = torch.randn(0, 3, 2, 4)
    out = cpu_kernels.broadcast_blocks(grid, (4, 2), (8, 8), torch.float32)
    assert out.shape == (0, 3, 8, 8)


def test_falls_back_to_reference_when_compiling_fails(monkeypatch,
                                                      tmp_path):
    from torch.utils import cpp_extension

    def fail(*args, **kwargs):
        raise RuntimeError('no C++ compiler')

    # no cached build, so loading compiles, which fails
    monkeypatch.setattr(cpu_kernels, 'library_path',
                        lambda: str(tmp_path / 'mmgradfilt_cpu_x.so'))
    monkeypatch.setattr(cpp_extension, 'load', fail)
    monkeypatch.setattr(cpu_kernels, 'loaded',
                        cpu_kernels.loaded.__wrapped__)
    with pytest.warns(UserWarning,
                      match=r'CPU kernels unavailable \(no C\+\+ compiler\)'):
        assert not cpu_kernels.available(torch.zeros(1, 1, 4, 4))
    monkeypatch.setattr(cpu_kernels, 'loaded', lambda: False)
    x = torch.randn(1, 2, 8, 8, requires_grad=True)
    weight = torch.randn(3, 2, 3, 3, requires_grad=True)
    out = grad_filter_conv2d(x, weight, padding=1, radius=4)
    out.sum().backward()
    want = weight.sum((0, 2, 3))[None, :, None, None].expand_as(x)
    torch.testing.assert_close(x.grad, want)


@needs_kernels
def test_cached_kernels_load_without_a_compile_message(caplog):
    """The compile message is printed only when a compile happens."""
    assert osp.exists(cpu_kernels.library_path())
    with caplog.at_level('INFO', logger='mmgradfilt'):
        assert cpu_kernels.loaded.__wrapped__()
    assert [r for r in caplog.records if r.name.startswith('mmgradfilt')] == []


def test_build_name_follows_the_source(monkeypatch, tmp_path):
    """A changed source gets a build of its own, never an older library."""
    source = tmp_path / 'kernels.cpp'
    source.write_text('// one')
    monkeypatch.setattr(cpu_kernels, '_SOURCE', str(source))
    first = cpu_kernels._build_name()
    assert first == cpu_kernels._build_name()
    source.write_text('// two')
    assert cpu_kernels._build_name() != first


# cpu_kernels on its own, with torch alone (no mmgradfilt, whose import
# brings in the OpenMMLab packages: most of a subprocess's time otherwise)
STANDALONE = (
    'import importlib.util, torch; '
    'spec = importlib.util.spec_from_file_location("cpu_kernels", '
    f'{cpu_kernels.__file__!r}); '
    'cpu_kernels = importlib.util.module_from_spec(spec); '
    'spec.loader.exec_module(cpu_kernels); ')
LOAD = STANDALONE + 'print("loaded", cpu_kernels.loaded())'


def _wait_for(path, text, timeout):
    """Wait until the file at ``path`` contains ``text``; its content."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = path.read_text() if path.exists() else ''
        if text in content:
            return content
        time.sleep(0.2)
    raise AssertionError(f'no {text!r} in {path} after {timeout} s: '
                         f'{content[-2000:]}')


@needs_kernels
def test_stale_build_lock_is_removed_and_the_build_proceeds(tmp_path):
    """An interrupted build's lock file: a later load waits while a live
    process holds the build, then says what it removes and builds.

    The cached build is copied without its library into a fresh
    ``TORCH_EXTENSIONS_DIR``, so the build is a link (seconds), not a
    compile (a minute).
    """
    fcntl = pytest.importorskip('fcntl')
    cached = osp.dirname(cpu_kernels.library_path())
    build_dir = tmp_path / osp.basename(cached)
    shutil.copytree(cached, build_dir, ignore=shutil.ignore_patterns(
        '*.so', 'lock', '*.lock'))
    stale = build_dir / 'lock'  # as torch's FileBaton leaves it: empty
    stale.touch()
    old = time.time() - 3600
    os.utime(stale, (old, old))
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path))
    log = tmp_path / 'stderr.txt'
    with open(build_dir / 'mmgradfilt_build.lock', 'a') as held, \
            open(log, 'w') as err:
        # a live build holds the lock: the stale-looking file is left alone
        fcntl.flock(held, fcntl.LOCK_EX)
        proc = subprocess.Popen([sys.executable, '-c', LOAD], env=env,
                                stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            _wait_for(log, 'waiting for another process to compile', 120)
            assert stale.exists()
            fcntl.flock(held, fcntl.LOCK_UN)
            out, _ = proc.communicate(timeout=300)
        finally:
            proc.kill()
    err = log.read_text()
    assert proc.returncode == 0, err[-3000:]
    assert 'loaded True' in out
    assert f'removing the stale build lock {stale}' in err
    assert 'compiling the CPU kernels' in err
    assert not stale.exists()
    assert (build_dir / (build_dir.name + '.so')).exists()
    # the next process loads the build at once, and says nothing
    proc = subprocess.run([sys.executable, '-c', LOAD], env=env,
                          capture_output=True, text=True, timeout=300)
    assert 'loaded True' in proc.stdout, proc.stderr[-3000:]
    assert 'compiling' not in proc.stderr and 'stale' not in proc.stderr


def test_environment_variable_turns_kernels_off():
    code = STANDALONE + 'print(cpu_kernels.available(torch.zeros(1, 1, 4, 4)))'
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True,
                          text=True, timeout=300,
                          env=dict(os.environ, MMGRADFILT_CPU_KERNELS='0'))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == 'False'

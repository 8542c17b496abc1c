"""Wall-clock timing of code on CPU or CUDA."""
import statistics
import time
from typing import Callable, Dict, List

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels on ``device`` (no-op on CPU)."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds ``fn`` takes, kernels included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def summarize(samples: List[float]) -> Dict:
    """Median, quartiles, min and max of a list of timings (seconds -> ms),
    and the timings themselves in the order taken."""
    taken = [s * 1e3 for s in samples]
    ms = sorted(taken)
    quartiles = (statistics.quantiles(ms, n=4) if len(ms) > 1 else
                 [ms[0]] * 3)
    return dict(median=statistics.median(ms), q1=quartiles[0],
                q3=quartiles[2], min=ms[0], max=ms[-1], n=len(ms),
                samples=taken)


def paired_ratio(numerator: Dict, denominator: Dict) -> float:
    """Median over runs of ``numerator / denominator`` timings taken in turn.

    Both summaries' samples must come from alternating runs: each pair then
    shares the machine's state, and a slow spell of a shared machine, which
    shifts a ratio of medians, cancels out.
    """
    pairs = list(zip(numerator['samples'], denominator['samples']))
    if len(pairs) != numerator['n'] or len(pairs) != denominator['n']:
        raise ValueError('paired_ratio needs timings of the same runs')
    return statistics.median(a / b for a, b in pairs)


def cuda_kernel_seconds(fn: Callable[[], object], iters: int) -> float:
    """Mean summed CUDA kernel time of ``fn`` per call, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    kernel_us = sum(e.device_time_total for e in prof.key_averages()
                    if e.device_type == torch.autograd.DeviceType.CUDA)
    return kernel_us / iters / 1e6

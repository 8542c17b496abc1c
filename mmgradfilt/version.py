import torch

__version__ = '0.1.0'

# the op casts under autocast with the device-type APIs that torch 2.4 added
# (torch.get_autocast_dtype, torch.is_autocast_enabled(device))
MIN_TORCH = (2, 4)


def check_torch(version: str) -> None:
    """Raise ImportError naming the installed torch when it is too old."""
    release = tuple(int(part) for part in
                    version.split('+')[0].split('.')[:2] if part.isdigit())
    if release < MIN_TORCH:
        raise ImportError(
            f'mmgradfilt needs torch >= {".".join(map(str, MIN_TORCH))}, '
            f'found torch {version}; upgrade it, e.g. '
            f'pip install "torch>={".".join(map(str, MIN_TORCH))}"')


check_torch(torch.__version__)

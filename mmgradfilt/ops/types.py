"""Types and checks shared by every layer of the package (plain Python)."""
from typing import Tuple, Union

from torch.nn.modules.utils import _pair

IntPair = Tuple[int, int]  # (height, width)
RadiusType = Union[int, IntPair]


def check_radius(radius: RadiusType) -> IntPair:
    """Return ``radius`` as an ``(rh, rw)`` pair of positive ints, or raise."""
    pair = _pair(radius)
    if len(pair) != 2 or not all(
            isinstance(r, int) and not isinstance(r, bool) and r >= 1
            for r in pair):
        raise ValueError(f'radius must be a positive int or a pair of them, '
                         f'got {radius!r}')
    return pair

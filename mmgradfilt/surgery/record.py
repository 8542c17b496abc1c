"""The one record every surgery step returns."""
from dataclasses import dataclass
from typing import Optional

from ..ops.types import IntPair

# what became of a part: changed now, given a new radius (filtered already),
# as wanted already, or left as it is (``detail`` says why)
STATUSES = ('installed', 'updated', 'unchanged', 'skipped')


@dataclass
class SurgeryRecord:
    """One part of a model a surgery step looked at, and what became of it.

    Args:
        part (str): ``'conv'``, ``'activation'``, ``'loss'`` or ``'norm'``.
        path (str): Its dotted path in the model.
        status (str): One of :data:`STATUSES`.
        detail (str): What it is or keeps for backward now; for
            ``'skipped'``, why it is left as it is. Defaults to ''.
        radius (tuple[int, int], optional): The patch size of a filtered conv
            or norm. Defaults to None.
        conv (str, optional): For a norm, the filtered conv that feeds it.
            Defaults to None.
    """
    part: str
    path: str
    status: str
    detail: str = ''
    radius: Optional[IntPair] = None
    conv: Optional[str] = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f'status must be one of {STATUSES}, got '
                             f'{self.status!r}')

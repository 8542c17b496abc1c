"""The paper's fine-tuning recipe as a ``GradientFilterHook`` config."""
from typing import Optional, Sequence


def last_blocks_hook(blocks: Sequence[str],
                     num_blocks: int,
                     radius: Optional[int] = None) -> dict:
    """Train the last ``num_blocks`` blocks (and the head), freeze the rest.

    Used by the classification configs: a model's base config lists its
    blocks from the last one backwards, a variant picks how many to train and
    the filter radius.

    Args:
        blocks (Sequence[str]): Dotted block paths, last block first.
        num_blocks (int): How many of them to train.
        radius (int, optional): Gradient-filter radius for their convs; None
            trains them with vanilla backprop. Defaults to None.

    Returns:
        dict: A ``GradientFilterHook`` config.
    """
    if not 1 <= num_blocks <= len(blocks):
        raise ValueError(f'num_blocks must be in [1, {len(blocks)}], got '
                         f'{num_blocks}')
    trained = list(blocks[:num_blocks])
    return dict(
        type='GradientFilterHook',
        filter_install=[] if radius is None else
        [dict(path=path, radius=radius) for path in trained],
        freeze_layers=['backbone'] + [f'~{path}' for path in trained])

"""The planner's quality measure: the weight-gradient fidelity
(:mod:`.fidelity`) of every candidate layer at every radius."""
from typing import Callable, Dict, Iterable, Sequence

import torch.nn as nn

from ..surgery import GradientFilterRecipe
from .fidelity import configured_models, measure_fidelity
from .plan import IntPair, Layer


def layer_cosines(model: nn.Module, recipe: GradientFilterRecipe,
                  layers: Sequence[Layer], batches: Iterable[Dict],
                  progress: Callable[[], None] = lambda: None
                  ) -> Dict[str, Dict[IntPair, float]]:
    """``{conv: {radius: mean weight-gradient cosine}}`` over ``batches``.

    ``recipe`` trains every one of ``layers`` (its freezing; its lean
    settings; no filter); ``model`` has no surgery yet and is left as it is.
    For each radius, a copy of ``model`` filters every layer whose patch
    fits at that radius (and, with the recipe's ``filter_norm``, their
    BatchNorms) and is measured against the exact model on the same batches
    (:func:`~mmgradfilt.analysis.fidelity.measure_fidelity`, the definition
    ``tools/grad_fidelity.py`` prints): a layer's figure includes what the
    filters between it and the loss did to its output gradient, as in a
    plan that filters those layers at that radius too.
    """
    radii = list(dict.fromkeys(r for layer in layers for r in layer.radii))
    if not radii:
        return {}
    exact, models = configured_models(model, {
        radius: recipe.replace(filter_install=tuple(
            (layer.path, radius) for layer in layers if radius in layer.radii))
        for radius in radii})
    results = measure_fidelity(models, exact, batches, progress=progress)
    cosines: Dict[str, Dict[IntPair, float]] = {}
    for radius, rows in results.items():
        for row in rows:
            if row['kind'] == 'conv' and row['weight_cos'] is not None:
                cosines.setdefault(row['layer'], {})[radius] = \
                    row['weight_cos']
    return cosines


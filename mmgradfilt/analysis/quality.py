"""Weight-gradient fidelity of every candidate layer at every radius, from
one recorded pass per batch of a model that trains them all vanilla."""
import statistics
from collections import defaultdict
from typing import Callable, Dict, Iterable, Sequence

import torch.nn as nn

from ..layers import GradFilterConv2d
from .fidelity import (GradientRecorder, exact_grads, layer_fidelity,
                       recorded_passes)
from .plan import IntPair, Layer


def layer_cosines(model: nn.Module, layers: Sequence[Layer],
                  batches: Iterable[Dict],
                  progress: Callable[[], None] = lambda: None
                  ) -> Dict[str, Dict[IntPair, float]]:
    """``{conv: {radius: mean weight-gradient cosine}}`` over ``batches``.

    ``model`` trains every one of ``layers`` with vanilla back-propagation,
    so each recorded (input, output gradient) pair is the exact one, not
    one that filters above it have changed; the filtered weight gradient of
    that pair at each of the layer's radii is compared with the exact one
    (:func:`~mmgradfilt.analysis.fidelity.layer_fidelity`).
    """
    recorder = GradientRecorder(model)
    # the candidates are plain convs: record them, and compare through
    # filtered twins that share their weights
    recorder.layers = {layer.path: model.get_submodule(layer.path)
                       for layer in layers if layer.radii}
    twins = {path: GradFilterConv2d.from_conv(conv, 1)
             for path, conv in recorder.layers.items()}
    radii = {layer.path: layer.radii for layer in layers}
    samples = defaultdict(list)
    with recorder:
        for records in recorded_passes(model, recorder, batches):
            for path, rec in records.items():
                if 'grad_out' not in rec:  # its output did not reach the loss
                    continue
                twin, x, grad_out = twins[path], rec['input'], rec['grad_out']
                exact = exact_grads(twin, x, grad_out)
                for radius in radii[path]:
                    samples[path, radius].append(layer_fidelity(
                        twin, x, grad_out, radius, exact)['weight_cos'])
            progress()
    cosines: Dict[str, Dict[IntPair, float]] = defaultdict(dict)
    for (path, radius), values in samples.items():
        cosines[path][radius] = statistics.fmean(values)
    return dict(cosines)

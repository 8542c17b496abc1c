"""Analysis of what gradient filtering does to training (not what it costs:
that is :mod:`mmgradfilt.benchmark`'s): how close the filtered gradients are
to the exact ones."""
from .fidelity import GradientRecorder, layer_fidelity, measure_fidelity

__all__ = ['GradientRecorder', 'layer_fidelity', 'measure_fidelity']

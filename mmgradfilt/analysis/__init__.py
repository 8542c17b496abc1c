"""Analysis of what gradient filtering does to training: how close the
gradients training applies are to exact ones (:mod:`.fidelity`, one
definition), and the budget planner built on it and on measured costs."""
from .fidelity import (configured_models, exact_model, gradient_fidelity,
                       layer_fidelity, measure_fidelity)

__all__ = ['configured_models', 'exact_model', 'gradient_fidelity',
           'layer_fidelity', 'measure_fidelity']

"""Model surgery on any ``nn.Module``: install gradient filters, freeze
layers by dotted path, make the training step lean; and the recipe that does
all three for a run."""
from .filters import FilterRecord, check_filter_install, install_gradient_filter
from .freeze import FreezeRecord, check_freeze_rules, eval_norms, freeze_layers
from .lean import LeanRecord, make_lean
from .paths import get_module, swap_modules
from .recipe import GradientFilterRecipe, SurgeryReport

__all__ = [
    'FilterRecord', 'check_filter_install', 'install_gradient_filter',
    'FreezeRecord', 'check_freeze_rules', 'eval_norms', 'freeze_layers',
    'LeanRecord', 'make_lean', 'get_module', 'swap_modules',
    'GradientFilterRecipe', 'SurgeryReport'
]

"""Model surgery on any ``nn.Module``: install gradient filters, freeze
layers by dotted path, make the training step lean; and the recipe that does
all three for a run. Each module a step looks at is reported as a
:class:`SurgeryRecord` with one status vocabulary (:data:`STATUSES`);
:func:`freeze_layers` reports its rules (:class:`FreezeRecord`)."""
from .filters import check_filter_install, install_gradient_filter
from .freeze import (FreezeRecord, check_freeze_rules, count_parameters,
                     eval_norms, freeze_layers, trained_modules)
from .lean import make_lean
from .norms import (filtered_norm_pairs, filtered_norm_records, frozen_in_eval,
                    install_filtered_norm)
from .paths import get_module, swap_modules
from .recipe import GradientFilterRecipe, SurgeryReport
from .record import STATUSES, SurgeryRecord
from .seg_loss import install_lean_loss, lean_loss_support, remove_lean_loss

__all__ = [
    'check_filter_install', 'install_gradient_filter', 'FreezeRecord',
    'check_freeze_rules', 'count_parameters', 'eval_norms', 'freeze_layers',
    'trained_modules', 'make_lean',
    'filtered_norm_pairs', 'filtered_norm_records', 'frozen_in_eval',
    'install_filtered_norm', 'get_module', 'swap_modules',
    'GradientFilterRecipe', 'SurgeryReport', 'STATUSES', 'SurgeryRecord',
    'install_lean_loss', 'lean_loss_support', 'remove_lean_loss'
]

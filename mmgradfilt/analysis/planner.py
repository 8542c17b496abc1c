"""The memory-budget planner as one call: :func:`plan_budget` measures a
config's model on this machine and returns a :class:`PlanResult`.

It measures, at the given batch and input size, what training the last k
conv layers costs (:func:`~.costs.measure_prefix`) and how close each
layer's filtered weight gradient is to the exact one on the config's data
and weights (:func:`~.quality.layer_cosines`); picks the plan that trains
the most conv layers within every budget (:func:`~.plan.choose_plan`) and
measures its whole step for real, choosing again under a budget shrunk by
the miss while it measures over (:func:`choose_measured`).
"""
import copy
import dataclasses
import itertools
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.runner import Runner
from mmengine.runner.utils import set_random_seed

from ..benchmark.step import (build_model, measure_step, prepare_step,
                              step_size, synthetic_batch)
from ..hooks import recipe_from_config
from ..report import MB, Column, Table, pair_label, pyplot, save_figure
from ..surgery import GradientFilterRecipe
from .costs import measure_prefix
from .plan import (Budget, IntPair, Layer, Plan, PrefixCosts, choose_plan,
                   fit_radii, freeze_rules, min_figures, trace_layers)
from .quality import layer_cosines
from .weights import check_weights, load_weights

# settings of a GradientFilterHook the plan keeps from the config's own
HOOK_SETTINGS = ('norm_eval', 'lean_memory', 'filter_norm')
# plans measured over budget before the planner gives up
MAX_ATTEMPTS = 5


class PlanError(Exception):
    """The planner cannot plan: an input it refuses (before it measures
    anything) or a budget no plan meets; the message says which."""


class Reporter:
    """What the planner says while it runs; this one says nothing.

    :meth:`say` gets a line; :meth:`progress` is called before a measure of
    ``total`` parts and returns what to call as each part ends.
    """

    def say(self, text: str) -> None:
        pass

    def progress(self, total: int) -> Callable[[], None]:
        return lambda: None


@dataclass
class PlanResult:
    """What :func:`plan_budget` found.

    Args:
        config (Config): The config planned (with the batch size planned).
        budget (Budget): The limits.
        input_size (tuple[int, int]), batch_size (int), device (str): What
            the costs were measured at.
        radii (list[int]), min_cosine (float): The candidate radii and the
            least weight-gradient cosine of a filtered layer.
        weights (str): What the fidelity measure's weights were.
        synthetic_data (bool): Whether it ran on random images and labels.
        layers (list[Layer]): The candidate conv layers, last first.
        classifier (str): The classifier's path (always trained).
        skipped (list[str]): Convs left out, with the reason.
        prefixes (list[PrefixCosts]): The costs of each prefix that could
            fit; ``stop`` the first one that cannot (None if all could).
        cosines (dict): ``{conv: {radius: weight-gradient cosine}}``.
        front (list[Plan]): Per number of trained layers, its best plan
            within the budget, else its smallest.
        chosen (Plan): The chosen plan; ``measured`` its whole step,
            measured (``saved_bytes``, ``peak_bytes``).
        rejected (list): ``(plan, measured)`` of the plans chosen before it
            that measured over the budget.
        settings (dict): The config's ``GradientFilterHook`` settings the
            plan keeps (those of :data:`HOOK_SETTINGS` that are not the
            hook's defaults).
        freeze_layers (list[str]): The chosen plan's freeze rules.
    """
    config: Config
    budget: Budget
    input_size: Tuple[int, int]
    batch_size: int
    device: str
    radii: List[int]
    min_cosine: float
    weights: str
    synthetic_data: bool
    layers: List[Layer]
    classifier: str
    skipped: List[str]
    prefixes: List[PrefixCosts]
    stop: Optional[PrefixCosts]
    cosines: Dict[str, Dict[IntPair, float]]
    front: List[Plan]
    chosen: Plan
    measured: Dict
    rejected: List[Tuple[Plan, Dict]]
    settings: Dict
    freeze_layers: List[str]

    @property
    def hook_cfg(self) -> Dict:
        """The chosen plan's ``GradientFilterHook``, as a config gives it."""
        return dict(type='GradientFilterHook',
                    filter_install=self.chosen.filter_install,
                    freeze_layers=self.freeze_layers, **self.settings)

    def to_json(self) -> Dict:
        """Everything measured and chosen, as plain data (plan.json)."""
        budget = self.budget
        return dict(
            weights=self.weights,
            data='synthetic' if self.synthetic_data else 'training',
            input_size=list(self.input_size), batch_size=self.batch_size,
            device=self.device, radii=self.radii, min_cosine=self.min_cosine,
            budget=dict(saved_MB=budget.saved_bytes / MB,
                        peak_MB=budget.peak_bytes and budget.peak_bytes / MB,
                        backward_GFLOPs=budget.backward_flops and
                        budget.backward_flops / 1e9),
            classifier=self.classifier, skipped=self.skipped,
            candidates=[dict(
                path=layer.path, norm=layer.norm, in_shape=layer.in_shape,
                out_shape=layer.out_shape,
                radii=[pair_label(r) for r in layer.radii],
                weight_cos={pair_label(r): c for r, c in
                            self.cosines.get(layer.path, {}).items()})
                for layer in self.layers],
            measured_prefixes=[p.to_dict() for p in self.prefixes],
            stopped_at=self.stop and self.stop.trained,
            front=[p.to_dict(self.cosines) for p in self.front],
            chosen=dict(**self.chosen.to_dict(self.cosines),
                        freeze_layers=self.freeze_layers,
                        measured=self.measured),
            rejected=[dict(**p.to_dict(self.cosines), measured=m)
                      for p, m in self.rejected])

    def front_table(self) -> Table:
        """The front, the chosen and rejected plans marked with their
        measured figures; the chosen plan last if it is not on the front
        (chosen under a budget shrunk after a miss)."""
        marks = [('*', self.chosen, self.measured)] + [
            ('x', p, m) for p, m in self.rejected]
        rows = []
        for plan in self.front:
            mark, result = next(((mark, m) for mark, p, m in marks
                                 if (p.trained, p.radii) ==
                                 (plan.trained, plan.radii)), ('', None))
            rows.append(_plan_row(plan, mark, plan.fits(self.budget), result))
        if not any(r[0] == '*' for r in rows):
            rows.append(_plan_row(self.chosen, '*', True, self.measured))
        return Table(FRONT_COLUMNS, rows)

    def chosen_table(self) -> Table:
        """The chosen plan's layers: norm, radius, weight-gradient cosine."""
        rows = []
        for layer in self.chosen.layers:
            radius = self.chosen.radii[layer.path]
            rows.append([layer.path, layer.norm or '-',
                         pair_label(radius) if radius else 'vanilla',
                         self.cosines[layer.path][radius] if radius else None])
        return Table([Column('trained layer', 'layer'),
                      Column('norm', 'norm'), Column('radius', 'radius'),
                      Column('dW cos', 'weight_cos', '.3f')], rows)

    def plot(self, path: str, title: str) -> None:
        """Saved MB against trained conv layers: vanilla, smallest and
        front plans, the budget, the chosen plan marked."""
        fig, ax = pyplot().subplots(figsize=(7, 4.5))
        ks = [p.trained for p in self.prefixes]
        ax.plot(ks, [p.saved_bytes / MB for p in self.prefixes], 'o-',
                color='gray', label='all vanilla')
        ax.plot(ks, [min_figures(p, self.layers).saved_bytes / MB
                     for p in self.prefixes],
                's--', color='tab:blue', label='smallest (every radius)')
        ax.plot([p.trained for p in self.front],
                [p.saved_bytes / MB for p in self.front], 'd-',
                color='tab:green',
                label='front: best within budget, else smallest')
        ax.axhline(self.budget.saved_bytes / MB, color='tab:red',
                   linestyle=':', label='budget')
        ax.plot([self.chosen.trained], [self.chosen.saved_bytes / MB], '*',
                markersize=16, color='tab:orange', label='chosen')
        ax.set_xlabel('trained conv layers (last k, + classifier)')
        ax.set_ylabel('saved for backward, MB (predicted)')
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
        save_figure(fig, path)


# (heading, CSV name, format) of the front table's columns
FRONT_COLUMNS = [Column(*column) for column in [
    ('', 'mark'), ('trained convs', 'trained_convs'),
    ('deepest trained', 'deepest_trained'), ('filtered', 'filtered'),
    ('saved MB', 'saved_predicted_MB', '.2f'),
    ('saved MB meas.', 'saved_measured_MB', '.2f'),
    ('peak MB', 'peak_predicted_MB', '.2f'),
    ('peak MB meas.', 'peak_measured_MB', '.2f'),
    ('bwd GFLOPs', 'backward_GFLOPs', '.3f'),
    ('mean dW cos', 'mean_weight_cos', '.3f'), ('fits', 'fits')]]

LEGEND = '\n'.join([
    'one row per number of trained conv layers (the last ones of the forward '
    'pass, with their norms; the classifier always trains): its best plan '
    'within the budget, else its smallest',
    '*: the chosen plan; x: chosen but measured over the budget',
    'saved: bytes kept for backward in one training forward; peak: allocator '
    'peak of a step above what was live before it (weights, batch); '
    'predicted from per-layer costs and each prefix\'s vanilla and '
    'all-filtered first steps (which also make the optimizer\'s state), '
    'never below the classifier-only step\'s; measured on the whole step '
    '(-: not measured), a later one',
    'bwd GFLOPs: conv layers\' backward; mean dW cos: weight-gradient cosine, '
    'filtered vs exact, over the trained layers (vanilla counts 1)',
])


def _plan_row(plan: Plan, mark: str, fits: bool,
              measured: Optional[Dict] = None) -> List:
    measured = measured or {}
    return [mark, plan.trained,
            plan.layers[-1].path if plan.layers else '(classifier only)',
            plan.describe(), plan.saved_bytes / MB,
            measured['saved_bytes'] / MB if measured else None,
            plan.peak_bytes / MB,
            measured['peak_bytes'] / MB if measured else None,
            plan.backward_flops / 1e9, plan.mean_cosine,
            'yes' if fits else 'no']


def kept_settings(recipe: GradientFilterRecipe) -> Dict:
    """The settings of :data:`HOOK_SETTINGS` in which ``recipe`` differs
    from the hook's defaults, as a config gives them."""
    given, default = recipe.to_config(), GradientFilterRecipe().to_config()
    return {k: given[k] for k in HOOK_SETTINGS if given[k] != default[k]}


def _check_config(cfg: Config) -> None:
    if not isinstance(cfg.get('model'), dict):
        raise PlanError(f'{cfg.filename} has no model: nothing to plan')
    if cfg.get('default_scope') not in ('mmseg', 'mmpretrain'):
        raise PlanError(f'{cfg.filename}: default_scope '
                        f'{cfg.get("default_scope")!r}; only mmseg and '
                        'mmpretrain configs can be planned')


def _fidelity_batches(cfg: Config, batches: int, seed: int):
    """The config's training batches the fidelity is measured on (the
    loader built now, so that missing data stops the planner before it
    measures anything)."""
    loader_cfg = copy.deepcopy(cfg.train_dataloader)
    # worker processes cost more to start than a few batches take
    loader_cfg.update(num_workers=0, persistent_workers=False)
    try:
        loader = Runner.build_dataloader(loader_cfg, seed=seed)
    # MMSeg asserts that a dataset's ann_file exists
    except (FileNotFoundError, AssertionError) as e:
        raise PlanError(f'training data: {e} (or pass --synthetic-data)'
                        ) from None
    return itertools.islice(iter(loader), batches)


def measure_plan(model: nn.Module, recipe: GradientFilterRecipe, cfg: Config,
                 batch: Dict, device: torch.device) -> Dict:
    """A plan's whole step, measured: saved bytes and peak (a step after the
    first, as in training)."""
    step = prepare_step(model, recipe, cfg.optim_wrapper, batch, device)
    result = measure_step(step, device)
    return dict(saved_bytes=result.saved_bytes, peak_bytes=result.peak_bytes)


def over(measured: Dict, budget: Budget) -> Dict[str, float]:
    """``{figure: measured / limit}`` of the measured figures over budget."""
    ratios = {}
    for key, limit in (('saved_bytes', budget.saved_bytes),
                       ('peak_bytes', budget.peak_bytes)):
        if limit is not None and measured[key] > limit:
            ratios[key] = measured[key] / limit
    return ratios


def smallest_message(prefix: PrefixCosts, layers: Sequence[Layer],
                     why: str) -> str:
    least = min_figures(prefix, layers)
    return (f'no plan fits the budget: {why}; the smallest plan, the '
            f'classifier alone, needs {least.saved_bytes / MB:.2f} MB saved '
            f'for backward, a {least.peak_bytes / MB:.2f} MB peak and '
            f'{least.backward_flops / 1e9:.3f} backward GFLOPs')


def measure_prefixes(model: nn.Module, layers: Sequence[Layer],
                     recipe_for: Callable[..., GradientFilterRecipe],
                     cfg: Config, batch: Dict, device: torch.device,
                     budget: Budget, progress: Callable[[], None]
                     ) -> Tuple[List[PrefixCosts], Optional[PrefixCosts]]:
    """The costs of each prefix of ``layers`` that could fit ``budget``, and
    the first that cannot (None if all could): a longer prefix keeps
    everything a shorter one does, and more. The classifier-only step's
    peak is every longer prefix's least peak."""
    prefixes = []
    for k in range(len(layers) + 1):
        prefix = measure_prefix(model, recipe_for(layers[:k]), layers, k,
                                cfg.optim_wrapper, batch, device)
        if prefixes:
            prefix.least_peak_bytes = prefixes[0].peak_bytes
        progress()
        if not min_figures(prefix, layers).fits(budget):
            return prefixes, prefix
        prefixes.append(prefix)
    return prefixes, None


def choose_measured(prefixes: Sequence[PrefixCosts], layers: Sequence[Layer],
                    cosines: Dict, budget: Budget, min_cosine: float,
                    measure: Callable[[Plan], Dict]
                    ) -> Tuple[Optional[Plan], Optional[Dict], List]:
    """The chosen plan whose measured step fits ``budget``, its measured
    figures and the plans measured over budget before it. After a miss, the
    next choice is made under the budget shrunk by the miss's factor, so
    it predicts correspondingly less."""
    target, rejected = budget, []
    for _ in range(MAX_ATTEMPTS):
        chosen, _ = choose_plan(prefixes, layers, cosines, target, min_cosine)
        if chosen is None:
            break
        measured = measure(chosen)
        ratios = over(measured, budget)
        if not ratios:
            return chosen, measured, rejected
        rejected.append((chosen, measured))
        target = dataclasses.replace(target, **{
            key: getattr(budget, key) * getattr(chosen, key) / measured[key]
            for key in ratios})
    return None, None, rejected


def plan_budget(cfg: Config, budget: Budget, *,
                input_size: Optional[Sequence[int]] = None,
                batch_size: Optional[int] = None,
                radii: Sequence[int] = (2, 4, 8),
                max_layers: Optional[int] = None,
                checkpoint: Optional[str] = None, min_cosine: float = 0.5,
                batches: int = 4, synthetic_data: bool = False,
                device: str = 'cpu', seed: int = 0,
                reporter: Optional[Reporter] = None) -> PlanResult:
    """Choose the conv layers to train, and their gradient-filter radii,
    for ``budget``, on this machine.

    Every input is checked before anything is measured.

    Args:
        cfg (Config): An MMSeg or MMPretrain config (not changed).
        budget (Budget): The limits.
        input_size (Sequence[int], optional): ``(h, w)`` of the costs;
            default: the config's training size.
        batch_size (int, optional): Default: the config's
            ``train_dataloader.batch_size``.
        radii (Sequence[int]): Candidate radii. Defaults to (2, 4, 8).
        max_layers (int, optional): Consider the last ``max_layers`` conv
            layers only. Defaults to None: all.
        checkpoint (str, optional): Weights of the fidelity measure;
            default: the config's ``load_from``, else its initialisation.
        min_cosine (float): Least weight-gradient cosine of a filtered
            layer. Defaults to 0.5.
        batches (int): Training batches of the fidelity measure. Defaults
            to 4.
        synthetic_data (bool): Measure fidelity on the costs' random batch
            instead of the config's training data. Defaults to False.
        device (str): Where to measure. Defaults to ``'cpu'``.
        seed (int): Seed of the weights' initialisation, the data order and
            augmentation. Defaults to 0.
        reporter (Reporter, optional): Told what the planner is doing.

    Raises:
        PlanError: For a config, checkpoint or data it cannot use, and where
            no plan meets the budget.
    """
    reporter = reporter or Reporter()
    _check_config(cfg)
    cfg = copy.deepcopy(cfg)
    if batch_size:
        cfg.train_dataloader.batch_size = batch_size
    try:
        size, batch_size, _ = step_size(cfg, input_size)
    except ValueError as e:
        raise PlanError(str(e)) from None
    try:  # the config's lean settings (filters and freezing are planned)
        base = recipe_from_config(cfg, required=False)
    except (TypeError, ValueError) as e:
        raise PlanError(str(e)) from None
    device = torch.device(device)
    set_random_seed(seed)

    model = build_model(cfg)
    checkpoint = checkpoint or cfg.get('load_from')
    try:
        check_weights(model, checkpoint, cfg)
    except FileNotFoundError as e:
        raise PlanError(str(e)) from None
    batch = synthetic_batch(cfg, batch_size, size)
    fidelity = ([batch] if synthetic_data else
                _fidelity_batches(cfg, batches, seed))

    weights = load_weights(model, checkpoint)
    model.to(device).train()
    # the costs' model pads its inputs to the planned size
    cost_model = copy.deepcopy(model)
    if getattr(cost_model.data_preprocessor, 'size', None) is not None:
        cost_model.data_preprocessor.size = size
    data = cost_model.data_preprocessor(batch, True)
    layers, classifier, skipped = trace_layers(
        cost_model, lambda: cost_model(**data, mode='loss'))
    layers = layers[:max_layers]
    fit_radii(layers, radii)

    def recipe_for(plan_layers: Sequence[Layer],
                   filter_install: Sequence[dict] = ()
                   ) -> GradientFilterRecipe:
        return base.replace(
            filter_install=filter_install,
            freeze_layers=freeze_rules(model, plan_layers, classifier))

    reporter.say(f'{len(layers)} candidate conv layers, classifier '
                 f'{classifier}; measuring the step of each prefix '
                 f'({batch_size} x {size[0]}x{size[1]}, {device.type})')
    prefixes, stop = measure_prefixes(
        cost_model, layers, recipe_for, cfg, batch, device, budget,
        reporter.progress(len(layers) + 1))
    if not prefixes:
        raise PlanError(smallest_message(stop, layers, 'not even the '
                                         'classifier alone fits'))
    if stop is not None:
        reporter.say(f'stopped at {stop.trained} trained layers: even '
                     'filtered, they need '
                     f'{min_figures(stop, layers).saved_bytes / MB:.2f} MB '
                     'saved for backward; longer prefixes need more')
    reach = prefixes[-1].trained
    reporter.say(f'measuring gradient fidelity of the last {reach} layers '
                 f'({weights}, {"synthetic" if synthetic_data else "training"}'
                 ' data)')
    fidelity = list(fidelity)
    cosines = layer_cosines(model, recipe_for(layers[:reach]),
                            layers[:reach], fidelity,
                            reporter.progress(len(fidelity)))

    chosen, measured, rejected = choose_measured(
        prefixes, layers, cosines, budget, min_cosine,
        lambda plan: measure_plan(
            cost_model, recipe_for(plan.layers, plan.filter_install), cfg,
            batch, device))
    if chosen is None:
        raise PlanError(smallest_message(
            prefixes[0], layers, f'the {len(rejected)} plans chosen measured '
            'over it'))
    _, front = choose_plan(prefixes, layers, cosines, budget, min_cosine)
    return PlanResult(
        cfg, budget, size, batch_size, device.type, list(radii), min_cosine,
        weights, synthetic_data, layers, classifier, skipped, prefixes, stop,
        cosines, front, chosen, measured, rejected, kept_settings(base),
        freeze_rules(model, chosen.layers, classifier))

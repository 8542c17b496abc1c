"""GradientFilterRecipe: one checked value for the surgery of a run, read
from a config once, changed by ``replace`` (checked again), applied as the
hook applies it."""
import dataclasses

import pytest
import torch
import torch.nn as nn
from mmengine.config import Config

from mmgradfilt import GradFilterConv2d, GradientFilterHook
from mmgradfilt.hooks import recipe_from_config
from mmgradfilt.surgery import GradientFilterRecipe

ARGS = dict(filter_install=[dict(path='body', radius=4),
                            dict(path='head', radius=(2, 3))],
            freeze_layers=['stem', '~stem.1'])


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4),
                      nn.ReLU()),
        nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4),
                      nn.ReLU()),
        nn.Conv2d(4, 2, 1))


def _named() -> nn.Module:
    """``_net`` with the children named stem, body, head."""
    model = nn.Module()
    model.stem, model.body, model.head = _net()
    return model


def test_fields_are_normalized_and_frozen():
    recipe = GradientFilterRecipe(**ARGS)
    assert recipe.filter_install == (('body', (4, 4)), ('head', (2, 3)))
    assert recipe.freeze_layers == ('stem', '~stem.1')
    assert recipe.filter_norm is True  # follows lean_memory
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.lean_memory = False
    # the normalized fields build the same recipe; to_config gives the args
    assert GradientFilterRecipe(recipe.filter_install,
                                recipe.freeze_layers) == recipe
    assert GradientFilterRecipe(**recipe.to_config()) == recipe
    assert recipe.to_config()['filter_install'] == [
        dict(path='body', radius=4), dict(path='head', radius=[2, 3])]
    assert recipe.to_config()['filter_norm'] is None
    assert hash(recipe) == hash(GradientFilterRecipe(**ARGS))


def test_replace_checks_again_and_filter_norm_keeps_following():
    recipe = GradientFilterRecipe(**ARGS)
    plain = recipe.replace(lean_memory=False)
    assert (plain.lean_memory, plain.filter_norm) == (False, False)
    assert plain.replace(lean_memory=True).filter_norm is True
    assert plain.filter_install == recipe.filter_install
    fixed = recipe.replace(filter_norm=False)
    assert fixed.replace(lean_memory=True).filter_norm is False
    with pytest.raises(ValueError, match='needs lean_memory=True'):
        recipe.replace(filter_norm=True).replace(lean_memory=False)
    with pytest.raises(ValueError, match='radius'):
        recipe.replace(filter_install=[dict(path='body', radius=0)])
    with pytest.raises(TypeError, match="norm_eval must be a bool, got 'no'"):
        recipe.replace(norm_eval='no')
    with pytest.raises(TypeError, match='unexpected keyword'):
        recipe.replace(radius=4)


def test_apply_reports_what_it_did_as_the_hook_logs_it():
    recipe = GradientFilterRecipe(**ARGS, lean_memory=False)
    model, other = _named(), _named()
    report = recipe.apply(model)
    assert [(r.path, r.radius) for r in report.filters] == [
        ('body.0', (4, 4)), ('head', (2, 3))]
    assert isinstance(model.body[0], GradFilterConv2d)
    assert [(r.rule, r.num_params) for r in report.freeze] == [
        ('stem', 4), ('~stem.1', 2)]
    assert report.lean is None
    # stem.0 (3*4*9 + 4) frozen of 112 + 8 + (4*4*9 + 4) + 8 + (4*2 + 2)
    assert (report.trainable_params, report.total_params) == (174, 286)
    assert report.trained_modules == ['stem.1', 'body', 'head']
    text = report.text()
    assert text.startswith('Gradient filter on 2 conv(s):')
    assert 'head    2x3     installed  2x4x1x1' in text
    assert 'Freeze rules (parameter tensors set): stem (4), ~stem.1 (2)' in text
    assert 'Lean memory' not in text
    assert GradientFilterHook(**ARGS, lean_memory=False).apply(other) == text


def test_hook_names_itself_in_errors_and_checks_changes():
    with pytest.raises(TypeError, match="^GradientFilterHook: lean_memory "
                       "must be a bool, got 'yes'$"):
        GradientFilterHook(lean_memory='yes')
    hook = GradientFilterHook(**ARGS)
    assert hook.recipe == GradientFilterRecipe(**ARGS)
    assert hook.freeze_layers == ['stem', '~stem.1']
    assert hook.filter_install == [dict(path='body', radius=4),
                                   dict(path='head', radius=[2, 3])]
    hook.lean_memory = False  # filter_norm was left to follow it
    assert hook.filter_norm is False
    with pytest.raises(ValueError, match='^GradientFilterHook: filter_norm'
                       '=True is part of the lean step'):
        hook.filter_norm = True
    with pytest.raises(ValueError, match='^GradientFilterHook: filter_install'
                       r'\[0\]'):
        hook.filter_install = [dict(path='body', radius=-1)]
    assert hook.recipe == GradientFilterRecipe(**ARGS, lean_memory=False)


def test_recipe_from_config_names_the_config(tmp_path):

    def config(*hooks) -> Config:
        path = tmp_path / 'my_cfg.py'
        path.write_text(f'custom_hooks = {list(hooks)!r}\n')
        return Config.fromfile(str(path))

    hook = dict(type='GradientFilterHook', priority='HIGH', **ARGS)
    assert recipe_from_config(config(dict(type='EMAHook'), hook)) == \
        GradientFilterRecipe(**ARGS)
    # a config without the hook: its defaults, where asked for
    assert recipe_from_config(config(), required=False) == \
        GradientFilterRecipe()
    with pytest.raises(ValueError, match='found 2$'):
        recipe_from_config(config(hook, hook), required=False)
    for hooks in ([], [hook, hook]):
        with pytest.raises(ValueError, match='my_cfg.py must have exactly '
                           'one GradientFilterHook in custom_hooks, found '
                           f'{len(hooks)}$'):
            recipe_from_config(config(*hooks))
    with pytest.raises(TypeError, match="my_cfg.py: GradientFilterHook: "
                       "norm_eval must be a bool, got 'yes'$"):
        recipe_from_config(config(dict(hook, norm_eval='yes')))
    with pytest.raises(TypeError, match='my_cfg.py: .*lean_memroy'):
        recipe_from_config(config(dict(hook, lean_memroy=True)))

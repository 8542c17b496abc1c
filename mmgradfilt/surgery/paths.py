"""Finding submodules by dotted path and swapping modules in place."""
import difflib
from typing import Dict

import torch.nn as nn


def get_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule at dotted ``path``; an unknown path names the nearest ones."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        pass
    parts = path.split('.')
    depth = next(i for i in range(len(parts), -1, -1)
                 if _has_submodule(model, '.'.join(parts[:i])))
    parent = '.'.join(parts[:depth])
    children = [n for n, _ in model.get_submodule(parent).named_children()]
    names = [name for name, _ in model.named_modules() if name]
    near = difflib.get_close_matches(path, names, n=3, cutoff=0.6)
    raise ValueError(
        f'"{path}" is not a submodule of {type(model).__name__}: '
        f'"{parent or type(model).__name__}" has no "{parts[depth]}" (its '
        f'children: {", ".join(children) or "none"}).' +
        (f' Nearest valid paths: {", ".join(near)}.' if near else ''))


def _has_submodule(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


def swap_modules(model: nn.Module, new: Dict[int, nn.Module]) -> None:
    """Replace every reference to a module whose id is in ``new`` by
    ``new[id]`` (a module reached by two paths is swapped under both)."""
    if not new:
        return
    for module in model.modules():
        for name, child in list(module._modules.items()):
            if child is not None and id(child) in new:
                setattr(module, name, new[id(child)])

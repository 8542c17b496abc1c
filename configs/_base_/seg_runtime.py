# MMSeg's runtime, plus the import that registers mmgradfilt's hooks, layers
# and datasets
_base_ = 'mmseg::_base_/default_runtime.py'
custom_imports = dict(imports=['mmgradfilt'], allow_failed_imports=False)

# A worked example of a user config: inherit one of ours and write only the
# delta. Here the demo fine-tuning gets the 10-layer recipe, a coarser filter
# on the ASPP branches and AdamW. Run it like any config:
#   python tools/train.py configs/demo_seg/example_user_filt10L_adamw.py
_base_ = './deeplabv3_r18-tiny-d8_full_1xb8-300_digits-shift-64x64.py'
custom_hooks = [
    dict(
        type='GradientFilterHook',
        # later items override the radius set by earlier ones
        filter_install=_base_.layers_10L.filter_install +
        [dict(path='decode_head.aspp_modules', radius=4)],
        freeze_layers=_base_.layers_10L.freeze_layers)
]
optim_wrapper = dict(
    optimizer=dict(_delete_=True, type='AdamW', lr=1e-3, weight_decay=0.01))

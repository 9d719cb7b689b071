# RefConv on MobileNetV3-Large with the official recipe (the schedule restarts from the baseline).
_base_ = './mobilenet-v3-large_8xb64-cos105e_in1k.py'

custom_imports = dict(imports=['refconv_mm'], allow_failed_imports=False)
# The official selection: the 3x3 stem and every depthwise conv are refocused; the 1x1
# expand/project convs, the last 1x1 conv and the SE layers stay plain (spatial_only).
refconv = dict(type='RefConv', spatial_only=True)  # map_k=3, init='zero'
model = dict(backbone=dict(conv_cfg=refconv))
custom_hooks = [dict(type='RefConvHook')]  # as the official code: all but the bases train
# Refocusing starts from the trained baseline: set this to its checkpoint
# (or pass --cfg-options load_from=...). RefConvHook warns if it is missing.
load_from = None

# RefConv on mmpretrain::resnet/resnet50_8xb32_in1k.py: every conv of the backbone (53: the
# 7x7 stem, the 1x1 and 3x3 convs of 16 bottlenecks, 4 downsample convs); the head is linear.
_base_ = 'mmpretrain::resnet/resnet50_8xb32_in1k.py'

custom_imports = dict(imports=['refconv_mm'], allow_failed_imports=False)
refconv = dict(type='RefConv')  # map_k=3, init='zero'
model = dict(backbone=dict(conv_cfg=refconv))
custom_hooks = [dict(type='RefConvHook')]
# Refocusing starts from a trained model: set this to its checkpoint
# (or pass --cfg-options load_from=...). RefConvHook warns if it is missing.
load_from = None

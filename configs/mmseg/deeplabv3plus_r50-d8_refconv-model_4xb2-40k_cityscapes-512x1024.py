# The whole-model route on mmseg::deeplabv3plus/deeplabv3plus_r50-d8_4xb2-40k_cityscapes-512x1024.py:
# every 2-D conv, the separable ASPP/bottleneck convs and conv_seg included.
_base_ = 'mmseg::deeplabv3plus/deeplabv3plus_r50-d8_4xb2-40k_cityscapes-512x1024.py'

custom_imports = dict(imports=['refconv_mm'], allow_failed_imports=False)
model = dict(_delete_=True, type='RefConvModel', model=_base_.model)  # map_k=3, init='zero'
custom_hooks = [dict(type='RefConvHook')]
# Refocusing starts from a trained model: set this to its checkpoint
# (or pass --cfg-options load_from=...). RefConvHook warns if it is missing.
load_from = None

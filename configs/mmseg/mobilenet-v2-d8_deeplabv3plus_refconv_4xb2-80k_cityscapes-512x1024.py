# RefConv on mmseg::mobilenet_v2/mobilenet-v2-d8_deeplabv3plus_4xb2-80k_cityscapes-512x1024.py.
_base_ = 'mmseg::mobilenet_v2/mobilenet-v2-d8_deeplabv3plus_4xb2-80k_cityscapes-512x1024.py'

custom_imports = dict(imports=['refconv_mm'], allow_failed_imports=False)
refconv = dict(type='RefConv')  # map_k=3, init='zero'
model = dict(backbone=dict(conv_cfg=refconv), decode_head=dict(conv_cfg=refconv), auxiliary_head=dict(conv_cfg=refconv))
custom_hooks = [dict(type='RefConvHook')]
# Refocusing starts from a trained model: set this to its checkpoint
# (or pass --cfg-options load_from=...). RefConvHook warns if it is missing.
load_from = None

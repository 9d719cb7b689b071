# RefConv on mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py.
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'

custom_imports = dict(imports=['refconv_mm'], allow_failed_imports=False)
refconv = dict(type='RefConv')  # map_k=3, init='zero'
model = dict(backbone=dict(conv_cfg=refconv), neck=dict(conv_cfg=refconv), roi_head=dict(mask_head=dict(conv_cfg=refconv)))
custom_hooks = [dict(type='RefConvHook')]
# Refocusing starts from a trained model: set this to its checkpoint
# (or pass --cfg-options load_from=...). RefConvHook warns if it is missing.
load_from = None

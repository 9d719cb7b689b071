# The whole-model route on mmdet::retinanet/retinanet_r50_fpn_1x_coco.py: every 2-D conv of the
# built model, retina_cls/retina_reg included (they never see conv_cfg).
_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'

custom_imports = dict(imports=['refconv_mm'], allow_failed_imports=False)
model = dict(_delete_=True, type='RefConvModel', model=_base_.model)  # map_k=3, init='zero'
custom_hooks = [dict(type='RefConvHook')]
# Refocusing starts from a trained model: set this to its checkpoint
# (or pass --cfg-options load_from=...). RefConvHook warns if it is missing.
load_from = None

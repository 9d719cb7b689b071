# The whole-model route on the same model and recipe: RefConvModel converts the built model's
# convs; spatial_only=True is the official selection (stem + depthwise), as the conv_cfg config.
_base_ = './mobilenet-v3-large_8xb64-cos105e_in1k.py'

custom_imports = dict(imports=['refconv_mm'], allow_failed_imports=False)
model = dict(_delete_=True, type='RefConvModel', model=_base_.model, spatial_only=True)
custom_hooks = [dict(type='RefConvHook')]
load_from = None

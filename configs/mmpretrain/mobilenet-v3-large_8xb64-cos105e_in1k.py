# Plain MobileNetV3-Large (mmpretrain::mobilenet_v3/mobilenet-v3-large_8xb128_in1k.py) with the
# official RefConv recipe, which trains the baseline and refocuses it with the same schedule.
# The RefConv configs beside this file inherit it; docs/user_guide.md "Classification (mmpretrain)" lists
# where it departs from the official code.
_base_ = 'mmpretrain::mobilenet_v3/mobilenet-v3-large_8xb128_in1k.py'

# SGD lr 0.1, momentum 0.9, weight decay 4e-5 on all parameters, batch 512 (8 GPUs x 64),
# 5 epochs of linear warm-up then 100 epochs of cosine decay.
train_dataloader = dict(batch_size=64)
val_dataloader = dict(batch_size=64)
test_dataloader = dict(batch_size=64)
optim_wrapper = dict(
    optimizer=dict(_delete_=True, type='SGD', lr=0.1, momentum=0.9, weight_decay=4e-5))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=True, begin=0, end=5,
         convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', T_max=100, eta_min=0.0, by_epoch=True, begin=5, end=105,
         convert_to_iter_based=True),
]
train_cfg = dict(by_epoch=True, max_epochs=105, val_interval=1)
auto_scale_lr = dict(base_batch_size=512)

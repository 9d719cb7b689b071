"""Config files that point an installed mmdet/mmseg/mmpretrain config at the shapes datasets.

:func:`write_config_pair` writes, into a work directory, the two files a user
would have: ``baseline.py`` (the ORIGINAL config, adapted to the data) and
``refconv.py`` (``_base_ = './baseline.py'`` plus the one-line RefConv override,
``custom_imports``, ``RefConvHook`` and ``load_from``).
"""
import os
import os.path as osp
import pprint
from typing import Dict, Optional

from .shapes_data import CLASSES, seg_classes

__all__ = ['DET_BASE', 'SEG_BASE', 'CLS_BASE', 'REFCONV_OVERRIDES', 'REFCONV_MODEL_OVERRIDE',
           'refconv_model_override', 'det_cpu_text', 'write_config_pair']

DET_BASE = 'mmdet::retinanet/retinanet_r18_fpn_1x_coco.py'
SEG_BASE = 'mmseg::fcn/fcn_r18-d8_4xb2-80k_cityscapes-512x1024.py'
CLS_BASE = 'mmpretrain::resnet/resnet18_8xb32_in1k.py'

# Which modules of each model family get conv_cfg=dict(type='RefConv') (the "one line").
REFCONV_OVERRIDES = {
    'retinanet': "dict(backbone=dict(conv_cfg=refconv), neck=dict(conv_cfg=refconv), "
                 "bbox_head=dict(conv_cfg=refconv))",
    'faster-rcnn': "dict(backbone=dict(conv_cfg=refconv), neck=dict(conv_cfg=refconv))",
    'seg': "dict(backbone=dict(conv_cfg=refconv), decode_head=dict(conv_cfg=refconv), "
           "auxiliary_head=dict(conv_cfg=refconv))",
    'cls': "dict(backbone=dict(conv_cfg=refconv))",
}


def refconv_model_override(**options) -> str:
    """The whole-model route's ``model = ...`` override (any task), for write_config_pair.

    Args:
        **options: ``RefConvModel`` options (``include``, ``exclude``, ``spatial_only``,
            ``map_k``, ``init``), written into the dict literal.
    """
    extra = ''.join(f', {k}={v!r}' for k, v in options.items())
    return f"dict(_delete_=True, type='RefConvModel', model=_base_.model{extra})"


# The whole-model route with the default options: pass as ``override`` to write_config_pair.
REFCONV_MODEL_OVERRIDE = refconv_model_override()


def det_cpu_text(width: int = 256, scratch: bool = True) -> str:
    """Config text that sizes RetinaNet for training from scratch on a CPU.

    Args:
        width: FPN and head channels (the original is 256): the head's convs cost most of a
            RetinaNet-R18 iteration at 128x128.
        scratch: Train the whole backbone with batch statistics. There are no ImageNet
            weights offline, and the original config freezes the (random) stem and layer1
            and keeps BN in eval mode with its initial statistics, which makes it diverge.
    """
    text = "model['backbone'].update(frozen_stages=-1, norm_eval=False)\n" if scratch else ''
    if width != 256:
        text += (f"model.setdefault('neck', dict()).update(out_channels={width})\n"
                 f"model['bbox_head'].update(in_channels={width}, feat_channels={width})\n")
    return text


def _det_body(data_root: str, size: int, batch: int) -> str:
    return f'''
data_root = {data_root!r}
metainfo = dict(classes={CLASSES!r})
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=({size}, {size}), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=({size}, {size}), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(
    batch_size={batch}, num_workers=0, persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    batch_sampler=None,
    dataset=dict(data_root=data_root, metainfo=metainfo, ann_file='annotations/train.json',
                 data_prefix=dict(img='train/'), pipeline=train_pipeline,
                 filter_cfg=dict(filter_empty_gt=True, min_size=4)))
val_dataloader = dict(
    batch_size={batch}, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo, ann_file='annotations/val.json',
                 data_prefix=dict(img='val/'), pipeline=test_pipeline, test_mode=True))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + '/annotations/val.json', metric='bbox',
                     format_only=False, backend_args=None)
test_evaluator = val_evaluator
'''


def _seg_body(data_root: str, size: int, batch: int) -> str:
    return f'''
data_root = {data_root!r}
dataset_type = 'BaseSegDataset'
metainfo = dict(classes={seg_classes()!r},
                palette=[[0, 0, 0], [220, 20, 60], [0, 128, 255], [255, 200, 0]])
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size={batch}, num_workers=0, persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(_delete_=True, type=dataset_type, data_root=data_root, metainfo=metainfo,
                 img_suffix='.png', seg_map_suffix='.png',
                 data_prefix=dict(img_path='img_dir/train', seg_map_path='ann_dir/train'),
                 pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1, num_workers=0, persistent_workers=False,
    dataset=dict(_delete_=True, type=dataset_type, data_root=data_root, metainfo=metainfo,
                 img_suffix='.png', seg_map_suffix='.png',
                 data_prefix=dict(img_path='img_dir/val', seg_map_path='ann_dir/val'),
                 pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator
norm_cfg = dict(type='BN', requires_grad=True)
crop_size = ({size}, {size})
data_preprocessor = dict(size=crop_size)
'''


def _cls_body(data_root: str, size: int, batch: int) -> str:
    # Annotation-file layout of make_classification_set: labels follow CLASSES' order.
    return f'''
data_root = {data_root!r}
dataset_type = 'CustomDataset'
metainfo = dict(classes={CLASSES!r})
data_preprocessor = dict(num_classes={len(CLASSES)})
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=({size}, {size})),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=({size}, {size})),
    dict(type='PackInputs'),
]
train_dataloader = dict(
    batch_size={batch}, num_workers=0, persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(_delete_=True, type=dataset_type, data_root=data_root, metainfo=metainfo,
                 ann_file='meta/train.txt', data_prefix='train', pipeline=train_pipeline))
val_dataloader = dict(
    batch_size={batch}, num_workers=0, persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(_delete_=True, type=dataset_type, data_root=data_root, metainfo=metainfo,
                 ann_file='meta/val.txt', data_prefix='val', pipeline=test_pipeline))
test_dataloader = val_dataloader
# top-5 is undefined with {len(CLASSES)} classes
val_evaluator = dict(type='Accuracy', topk=(1, ))
test_evaluator = val_evaluator
'''


def _schedule(iters: int, optimizer: dict, val_interval: Optional[int], ckpt_interval: int,
              log_interval: int) -> str:
    val_interval = val_interval or iters
    return f'''
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters={iters},
                 val_interval={val_interval})
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
optim_wrapper = dict(_delete_=True, type='OptimWrapper',
                     optimizer={optimizer!r},
                     clip_grad=dict(max_norm=10.0, norm_type=2))
param_scheduler = [dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0,
                        end={max(1, min(50, iters // 5))})]
default_hooks = dict(
    logger=dict(type='LoggerHook', interval={log_interval}),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval={ckpt_interval},
                    max_keep_ckpts=2))
log_processor = dict(by_epoch=False, window_size={log_interval})
env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
               dist_cfg=dict(backend='gloo'))
randomness = dict(seed=0, deterministic=False)
auto_scale_lr = dict(enable=False)
'''


def write_config_pair(work_dir: str, data_root: str, task: str = 'det',
                      base: Optional[str] = None, iters: int = 40, refocus_iters: int = 40,
                      size: int = 128, batch: int = 4, lr: float = 0.01,
                      optimizer: Optional[dict] = None, refocus_lr: Optional[float] = None,
                      val_interval: Optional[int] = None,
                      ckpt_interval: Optional[int] = None, log_interval: int = 10,
                      override: Optional[str] = None, load_from: Optional[str] = None,
                      hook: Optional[dict] = None, refconv: Optional[dict] = None,
                      extra: str = '', refconv_extra: str = '') -> Dict[str, str]:
    """Write ``baseline.py`` and ``refconv.py`` for the shapes data into ``work_dir``.

    Args:
        task: ``'det'`` (COCO-format set, :data:`DET_BASE`), ``'seg'`` (:data:`SEG_BASE`) or
            ``'cls'`` (:func:`make_classification_set`'s set, :data:`CLS_BASE`).
        base: The installed config to adapt (``'mmdet::...'``/``'mmseg::...'``/
            ``'mmpretrain::...'``).
        lr, optimizer: The optimizer config without ``lr`` (default SGD, momentum 0.9,
            weight decay 1e-4) and its lr; ``refocus_lr`` overrides the lr in ``refconv.py``.
        override: The RefConv ``model = ...`` override (a dict literal using ``refconv``;
            default :data:`REFCONV_OVERRIDES` of the task; :data:`REFCONV_MODEL_OVERRIDE`
            for the whole-model route).
        load_from: The trained checkpoint the RefConv config starts from.
        extra, refconv_extra: Config text appended to ``baseline.py`` / ``refconv.py``.

    Returns:
        ``{'baseline': path, 'refconv': path}``.
    """
    os.makedirs(work_dir, exist_ok=True)
    if task not in ('det', 'seg', 'cls'):
        raise ValueError(f"task={task!r} must be 'det', 'seg' or 'cls'")
    base = base or dict(det=DET_BASE, seg=SEG_BASE, cls=CLS_BASE)[task]
    ckpt_interval = ckpt_interval or iters
    optimizer = dict(optimizer or dict(type='SGD', momentum=0.9, weight_decay=1e-4), lr=lr)
    if task == 'det':
        # score_thr=0: even a barely trained detector returns boxes, so mAP is always defined.
        model = (f"model = dict(backbone=dict(init_cfg=None), "
                 f"bbox_head=dict(num_classes={len(CLASSES)}), test_cfg=dict(score_thr=0.0))\n")
        if 'rcnn' in base:
            model = (f"model = dict(backbone=dict(init_cfg=None), roi_head=dict(bbox_head=dict("
                     f"num_classes={len(CLASSES)})), test_cfg=dict(rcnn=dict(score_thr=0.0)))\n")
        body = _det_body(data_root, size, batch) + model
        override = override or REFCONV_OVERRIDES['retinanet']
    elif task == 'seg':
        n = len(seg_classes())
        body = _seg_body(data_root, size, batch) + (
            'model = dict(data_preprocessor=data_preprocessor, pretrained=None, '
            'backbone=dict(init_cfg=None, norm_cfg=norm_cfg), '
            f'decode_head=dict(num_classes={n}, norm_cfg=norm_cfg), '
            f'auxiliary_head=dict(num_classes={n}, norm_cfg=norm_cfg))\n')
        override = override or REFCONV_OVERRIDES['seg']
    else:
        n = len(CLASSES)
        body = _cls_body(data_root, size, batch) + (
            f'model = dict(head=dict(num_classes={n}, topk=(1, )))\n')
        override = override or REFCONV_OVERRIDES['cls']
    baseline = (f'# ORIGINAL config: {base} on the generated shapes data.\n'
                f'_base_ = {base!r}\n' + body +
                _schedule(iters, optimizer, val_interval, ckpt_interval, log_interval) + extra)
    paths = dict(baseline=osp.join(work_dir, 'baseline.py'),
                 refconv=osp.join(work_dir, 'refconv.py'))
    with open(paths['baseline'], 'w') as f:
        f.write(baseline)
    hook = hook or dict(type='RefConvHook')
    refconv = refconv or dict(type='RefConv')
    text = (
        "# The one-line RefConv override on top of the original config.\n"
        "_base_ = './baseline.py'\n"
        "custom_imports = dict(imports=['refconv_mm'], allow_failed_imports=False)\n"
        f"refconv = {refconv!r}\n"
        f"model = {override}\n"
        f"custom_hooks = [{pprint.pformat(hook)}]\n"
        f"load_from = {load_from!r}\n"
        f"train_cfg = dict(max_iters={refocus_iters}, val_interval="
        f"{val_interval or refocus_iters})\n"
        f"default_hooks = dict(checkpoint=dict(interval={ckpt_interval}))\n")
    if refocus_lr is not None:
        text += f'optim_wrapper = dict(optimizer=dict(lr={refocus_lr}))\n'
    text += refconv_extra
    with open(paths['refconv'], 'w') as f:
        f.write(text)
    return paths

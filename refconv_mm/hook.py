"""RefConvHook: keeps RefConv bases frozen, applies the training recipe, reports, exports."""
import os.path as osp
from typing import Dict, List, Tuple

import torch
import torch.nn as nn
from mmengine.hooks import EMAHook, Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from torch.nn.parallel import DistributedDataParallel

from .compat import COMPILE_MIN_TORCH, torch_version
from .refconv import RefConv2d

__all__ = ['RefConvHook', 'refconv_summary']

RECIPES = ('basis_frozen', 'refocus_only')
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def refconv_summary(model: nn.Module) -> Dict[str, object]:
    """Counts of RefConv layers and of frozen / trainable parameters in ``model``."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, RefConv2d)}
    basis = {id(p) for m in layers.values() for p in (m.weight, m.bias) if p is not None}
    refocus = {id(m.refocus_weight) for m in layers.values()}
    counts = dict(basis=0, refocus=0, refocus_frozen=0, other_trainable=0, other_frozen=0)
    for p in model.parameters():
        if id(p) in basis:
            key = 'basis'
        elif id(p) in refocus:  # a model may freeze some itself (ResNet frozen_stages)
            key = 'refocus' if p.requires_grad else 'refocus_frozen'
        else:
            key = 'other_trainable' if p.requires_grad else 'other_frozen'
        counts[key] += p.numel()
    unloaded = [n for n, m in layers.items() if not m.basis_loaded]
    return dict(layers=len(layers), unloaded=unloaded, **counts)


@HOOKS.register_module()
class RefConvHook(Hook):
    """Refocus training around a trained model's RefConv layers.

    RefConv freezes its basis when it is built, before the runner wraps the
    model in DDP or builds the optimizer, so the default recipe needs no change
    of ``requires_grad`` here. This hook checks that freeze, applies the
    optional ``'refocus_only'`` recipe, logs a summary once the checkpoint is
    loaded, warns about bases that no checkpoint filled, and can export the
    merged plain checkpoint after training.

    Args:
        recipe: ``'basis_frozen'`` (default, the paper's recipe: everything but
            the bases trains) or ``'refocus_only'`` (only ``refocus_weight``,
            plus norm layers if ``train_norm``).
        train_norm: With ``'refocus_only'``, keep norm layers trainable.
        merge_after_run: Write ``<work_dir>/<merged_name>`` (plain keys) when training
            ends: the weights the run's checkpoints hold, i.e. the EMA model's where an
            ``EMAHook`` runs (what validation measured), else the model's. A val or test
            run writes nothing (mmengine's EMAHook rebuilds its copy from the model then).
        merged_name: File name of that checkpoint.
        strict_basis: Raise instead of warning when a basis was never loaded and no
            ``load_from`` was given (with ``load_from`` it always raises).
    """

    priority = 'VERY_HIGH'

    def __init__(self,
                 recipe: str = 'basis_frozen',
                 train_norm: bool = True,
                 merge_after_run: bool = False,
                 merged_name: str = 'refconv_merged.pth',
                 strict_basis: bool = False) -> None:
        if recipe not in RECIPES:
            raise ValueError(f'RefConvHook: recipe={recipe!r} is not one of {RECIPES}.')
        self.recipe = recipe
        self.train_norm = train_norm
        self.merge_after_run = merge_after_run
        self.merged_name = merged_name
        self.strict_basis = strict_basis

    @staticmethod
    def _module(runner) -> nn.Module:
        return runner.model.module if is_model_wrapper(runner.model) else runner.model

    def _frozen_by_recipe(self, model: nn.Module) -> List[nn.Parameter]:
        keep = set()
        for m in model.modules():
            if isinstance(m, RefConv2d):
                keep.add(id(m.refocus_weight))
            elif self.train_norm and isinstance(m, _NORMS):
                keep.update(id(p) for p in m.parameters(recurse=False))
        return [p for p in model.parameters() if p.requires_grad and id(p) not in keep]

    def before_run(self, runner) -> None:
        model = self._module(runner)
        layers = [m for m in model.modules() if isinstance(m, RefConv2d)]
        if not layers:
            raise RuntimeError(
                'RefConvHook: the model has no RefConv layer. Add '
                "conv_cfg=dict(type='RefConv') to the modules to refocus, or wrap the model: "
                "model = dict(_delete_=True, type='RefConvModel', model=_base_.model); and "
                "custom_imports=dict(imports=['refconv_mm']) to the config.")
        if runner.cfg.get('compile') and torch_version() < COMPILE_MIN_TORCH:
            raise RuntimeError(
                'RefConvHook: torch.compile (the config\'s `compile`) with RefConv needs torch '
                f'>= {".".join(map(str, COMPILE_MIN_TORCH[:2]))}; this is torch '
                f'{torch.__version__}, whose dynamo cannot tell the layer it is being traced. '
                'Remove `compile` from the config or upgrade torch.')
        thawed = [m for m in layers if m.weight.requires_grad
                  or (m.bias is not None and m.bias.requires_grad)]
        if thawed:
            raise RuntimeError(f'RefConvHook: {len(thawed)} RefConv bases require grad; something '
                               'unfroze them after the model was built. Leave the bases frozen.')
        if self.recipe == 'refocus_only':
            frozen = self._frozen_by_recipe(model)
            for p in frozen:
                p.requires_grad_(False)
            if frozen and isinstance(runner.model, DistributedDataParallel):
                # DDP's reducer fixed its parameter set at wrap time: wrap again.
                old = runner.model
                runner.model = type(old)(
                    module=old.module, device_ids=old.device_ids,
                    output_device=old.output_device, broadcast_buffers=old.broadcast_buffers,
                    find_unused_parameters=old.find_unused_parameters)
            runner.logger.info(f'RefConvHook: recipe refocus_only froze {len(frozen)} '
                               'non-RefConv parameter tensors.')

    def before_train(self, runner) -> None:
        # Runs after load_from / resume, so the basis check sees the loaded model.
        s = refconv_summary(self._module(runner))
        runner.logger.info(
            f"RefConvHook: {s['layers']} RefConv layers; frozen basis params {s['basis']:,}; "
            f"trainable refocusing params {s['refocus']:,} (frozen by the model, e.g. "
            f"frozen_stages: {s['refocus_frozen']:,}); other trainable params "
            f"{s['other_trainable']:,}; other frozen params {s['other_frozen']:,}; "
            f'recipe {self.recipe}.')
        if s['unloaded']:
            names = ', '.join(s['unloaded'][:10]) + (' ...' if len(s['unloaded']) > 10 else '')
            load_from = getattr(runner, '_load_from', None)
            msg = (f"RefConvHook: {len(s['unloaded'])} of {s['layers']} RefConv bases were never "
                   f'loaded from a checkpoint and stay RANDOM and FROZEN: {names}. ')
            if load_from:
                # A checkpoint was given but does not fit: never train on a random basis.
                raise RuntimeError(msg + f'load_from={load_from!r} does not match this model '
                                   '(wrong architecture or missing/mis-shaped basis keys); point '
                                   'it at a checkpoint of the ORIGINAL config of this model.')
            msg += ('Set load_from to the trained model, or remove the RefConv override from '
                    'modules that have no trained weights.')
            if self.strict_basis:
                raise RuntimeError(msg)
            runner.logger.warning('!' * 20 + ' ' + msg)

    def exported_state_dict(self, runner) -> Tuple[Dict[str, torch.Tensor], str]:
        """The weights a checkpoint of this run holds, and whose they are (``'EMA'``/``'model'``).

        EMAHook writes its averaged weights under a checkpoint's ``state_dict`` and validates
        with them, so the export takes them too.
        """
        for hook in runner.hooks:
            if isinstance(hook, EMAHook) and getattr(hook, 'ema_model', None) is not None:
                return hook.ema_model.module.state_dict(), 'EMA'
        return self._module(runner).state_dict(), 'model'

    def after_train(self, runner) -> None:
        if not self.merge_after_run or runner.rank != 0:
            return
        from .checkpoint import save_merged_checkpoint
        out = osp.join(runner.work_dir, self.merged_name)
        state, whose = self.exported_state_dict(runner)
        # What a Runner checkpoint's meta holds (mmseg's init_model reads dataset_meta).
        info = runner.message_hub.runtime_info
        meta = dict(epoch=runner.epoch, iter=runner.iter)
        meta.update({k: info[k] for k in ('cfg', 'seed', 'experiment_name', 'mmengine_version',
                                          'dataset_meta') if k in info})
        save_merged_checkpoint(state, out, meta=meta, overwrite=True)
        runner.logger.info(f'RefConvHook: merged plain checkpoint ({whose} weights) written to '
                           f'{out}')

"""A test-only hook, imported through ``custom_imports``: dumps each rank's weights."""
import os.path as osp

import torch
from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS


@HOOKS.register_module()
class RankDumpHook(Hook):
    """Saves ``{stage}_rank{r}.pth`` (state dict, iteration, optimizer state) into work_dir."""

    priority = 'LOWEST'

    def _dump(self, runner, stage):
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        opt = runner.optim_wrapper.optimizer.state_dict()
        torch.save(dict(state_dict=model.state_dict(), iter=runner.iter,
                        optimizer_state=opt['state'],
                        wrapper=type(runner.model).__name__),
                   osp.join(runner.work_dir, f'{stage}_rank{get_rank()}.pth'))

    def before_train(self, runner):
        self._dump(runner, 'before_train')

    def after_train(self, runner):
        self._dump(runner, 'after_train')

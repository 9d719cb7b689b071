"""A test-only optimizer wrapper, imported through ``custom_imports``: mmengine's ``--amp`` on a CPU.

mmengine's ``AmpOptimWrapper`` (what ``tools/train.py --amp`` selects) refuses to build without
an accelerator. ``CPUAmpOptimWrapper`` is that class with the refusal passed and a CPU
``GradScaler``: its training path (autocast in ``optim_context``, scaled backward, unscale
before gradient clipping, scaler step and update) runs as it does on a GPU, with bf16 autocast
(the dtype CPU autocast supports) where a GPU would run fp16.
"""
import torch
import mmengine.optim.optimizer.amp_optimizer_wrapper as amp_wrapper
from mmengine.optim import AmpOptimWrapper
from mmengine.registry import OPTIM_WRAPPERS


@OPTIM_WRAPPERS.register_module()
class CPUAmpOptimWrapper(AmpOptimWrapper):
    """``AmpOptimWrapper`` on a CPU (bf16 autocast, ``torch.amp.GradScaler('cpu')``)."""

    def __init__(self, loss_scale='dynamic', dtype='bfloat16', **kwargs):
        check = amp_wrapper.is_cuda_available
        amp_wrapper.is_cuda_available = lambda: True  # the accelerator check, nothing else
        try:
            super().__init__(loss_scale=loss_scale, dtype=dtype, **kwargs)
        finally:
            amp_wrapper.is_cuda_available = check
        init = dict(init_scale=loss_scale) if isinstance(loss_scale, float) else (
            loss_scale if isinstance(loss_scale, dict) else {})
        self.loss_scaler = torch.amp.GradScaler('cpu', **init)

"""Multi-process training on machines without CUDA (gloo), through mmengine's launcher path."""
import os

import torch
import torch.distributed as torch_dist
from mmengine.model import MMDistributedDataParallel
from mmengine.registry import MODEL_WRAPPERS

__all__ = ['DeviceAgnosticDDP', 'launcher_env_problem', 'setup_distributed']

# What torchrun exports to each process and mmengine's `pytorch` launcher reads.
TORCHRUN_VARS = ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')


@MODEL_WRAPPERS.register_module()
class DeviceAgnosticDDP(MMDistributedDataParallel):
    """``MMDistributedDataParallel`` that also wraps a CPU module.

    mmengine passes ``device_ids=[LOCAL_RANK]``, which DDP accepts for CUDA
    modules only; for a CPU module the ids are dropped (DDP's CPU mode).
    """

    def __init__(self, module, detect_anomalous_params: bool = False, **kwargs):
        if next(module.parameters()).device.type == 'cpu':
            kwargs['device_ids'] = None
            kwargs['output_device'] = None
        super().__init__(module, detect_anomalous_params=detect_anomalous_params, **kwargs)


def launcher_env_problem(launcher: str, tool: str) -> str:
    """Why ``--launcher pytorch`` cannot start in this process ('' when it can).

    Started outside torchrun, the variables it sets are missing and the launcher would end in
    a bare ``KeyError: 'RANK'``.
    """
    if launcher != 'pytorch':
        return ''
    missing = [v for v in TORCHRUN_VARS if v not in os.environ]
    if not missing:
        return ''
    return (f'--launcher pytorch needs the variables torchrun sets ({", ".join(missing)} '
            f'missing): run `torchrun --nproc_per_node N {tool} CONFIG ... --launcher pytorch`, '
            'or leave out --launcher for one process.')


def setup_distributed(cfg, launcher: str) -> None:
    """Prepare ``cfg`` for ``launcher`` when there is no CUDA device.

    mmengine's ``pytorch`` launcher calls ``torch.cuda.set_device`` and wraps the
    model with ``device_ids=[LOCAL_RANK]``; without CUDA, start the gloo process
    group here (the Runner then skips its own ``init_dist``) and use
    :class:`DeviceAgnosticDDP`. With CUDA nothing changes.
    """
    if launcher == 'none' or torch.cuda.is_available():
        return
    if launcher != 'pytorch':
        raise ValueError(f'launcher {launcher!r} needs CUDA; on CPU use --launcher pytorch '
                         'under torchrun (gloo backend).')
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend='gloo', init_method='env://',
                                      rank=int(os.environ['RANK']),
                                      world_size=int(os.environ['WORLD_SIZE']))
    cfg.setdefault('env_cfg', {}).setdefault('dist_cfg', {})['backend'] = 'gloo'
    wrapper = cfg.get('model_wrapper_cfg') or {}
    if wrapper.get('type', 'MMDistributedDataParallel') == 'MMDistributedDataParallel':
        cfg.model_wrapper_cfg = dict(wrapper, type='DeviceAgnosticDDP')

"""``torch.compile`` through mmengine's ``compile`` config key, on RefConv models.

mmengine's Runner compiles the model's whole ``train_step`` (data preprocessing, forward, loss,
backward and optimizer update). A RefConv model must train there, give the eager losses within
floating-point tolerance, break the graph nowhere the plain model does not, and not recompile
from one step to the next. The ``aot_eager`` backend runs dynamo and AOTAutograd (the joint
forward-backward graph and its partition) without inductor's code generation, which the speed
benchmark measures instead (``speed_memory.py --compile``).
"""

import pytest
import torch
from mmengine.hooks import Hook

from refconv_mm.compat import COMPILE_MIN_TORCH, torch_version

from refconv_mm.experiments.shapes_configs import write_config_pair

BACKEND = 'aot_eager'
STEPS = 5
pytestmark = pytest.mark.skipif(
    torch_version() < COMPILE_MIN_TORCH,
    reason='RefConv under torch.compile needs torch >= 2.1 (test_hook checks the refusal)')


class StepRecorder(Hook):
    """After every training iteration: the loss, and how many graphs dynamo has compiled."""

    priority = 'LOWEST'

    def __init__(self) -> None:
        self.losses, self.graphs = [], []

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        from torch._dynamo.utils import counters
        self.losses.append(float(outputs['loss']))
        self.graphs.append(counters['stats']['unique_graphs'])


def train_recorded(cfg_path: str, work_dir: str, compile_cfg, load_from=None) -> dict:
    """``STEPS`` training iterations of a real Runner; losses, graphs per step, graph breaks.

    The same batch every step, no random flip and no gradient clipping: the PLAIN models
    recompile otherwise at every step (mmdet's losses guard on each image's metainfo, e.g.
    ``img_id`` and ``flip``; clipping logs the gradient norm inside ``train_step``), which would
    hide a recompile that RefConv causes. mmdet's data preprocessor still recompiles every step
    (a guard on the identity of each sample's ``img_path`` string, through a deepcopy) until
    dynamo's cache limit runs it eagerly: that is mmdet's, and the same with and without RefConv.
    """
    from mmengine.config import Config
    from mmengine.runner import Runner
    from torch._dynamo.utils import counters
    cfg = Config.fromfile(cfg_path)
    cfg.work_dir = work_dir
    cfg.compile = compile_cfg
    cfg.load_from = load_from
    loader = cfg.train_dataloader
    loader.sampler = dict(type='InfiniteSampler', shuffle=False)
    loader.dataset.indices = loader.batch_size  # one batch, seen every step
    loader.dataset.pipeline = [t for t in loader.dataset.pipeline if t['type'] != 'RandomFlip']
    cfg.optim_wrapper.clip_grad = None
    cfg.train_cfg.max_iters = STEPS
    cfg.train_cfg.val_interval = STEPS + 1  # training only
    cfg.default_hooks.checkpoint.interval = STEPS + 1
    cfg.default_hooks.checkpoint.save_last = False
    runner = Runner.from_cfg(cfg)
    rec = StepRecorder()
    runner.register_hook(rec)
    torch._dynamo.reset()
    counters.clear()
    runner.train()
    return dict(losses=rec.losses, graphs=rec.graphs,
                breaks=dict(counters['graph_break']), model=runner.model)


def _check(plain: dict, eager: dict, compiled: dict, rtol: float, settles: bool) -> None:
    # trains, and as eager does
    torch.testing.assert_close(torch.tensor(compiled['losses']), torch.tensor(eager['losses']),
                               rtol=rtol, atol=1e-6)
    assert compiled['losses'][-1] != compiled['losses'][0]
    # no graph break that the plain model does not have
    n_ref, n_plain = sum(compiled['breaks'].values()), sum(plain['breaks'].values())
    extra = set(compiled['breaks']) - set(plain['breaks'])
    assert n_ref <= n_plain and not extra, (n_ref, n_plain, sorted(extra)[:5])
    # RefConv compiles what plain compiles, step by step: no recompile of its own ...
    assert compiled['graphs'] == plain['graphs'], (compiled['graphs'], plain['graphs'])
    # ... and where the plain model settles, no new graph after the second step (the
    # optimizer's state appears in the first)
    if settles:
        assert compiled['graphs'][1] == compiled['graphs'][-1] > 0, compiled['graphs']


def test_retinanet_compiled_train_step(det_data, tmp_path):
    """RetinaNet-R18 with RefConv on backbone, neck and the head shared by the FPN levels."""
    paths = write_config_pair(str(tmp_path), det_data['data_root'], 'det', iters=STEPS,
                              refocus_iters=STEPS, size=64, batch=2, log_interval=1,
                              refconv=dict(type='RefConv', init='official'))
    compile_cfg = dict(backend=BACKEND)
    plain = train_recorded(paths['baseline'], str(tmp_path / 'p'), compile_cfg)
    eager = train_recorded(paths['refconv'], str(tmp_path / 'e'), None)
    compiled = train_recorded(paths['refconv'], str(tmp_path / 'c'), compile_cfg)
    _check(plain, eager, compiled, rtol=1e-4, settles=False)
    refocus = [n for n, p in compiled['model'].named_parameters() if n.endswith('refocus_weight')
               and p.requires_grad]
    assert len(refocus) > 20


def test_mmpretrain_classifier_compiled_train_step(tmp_path_factory, tmp_path):
    """The shapes ResNet-18 classifier of the mmpretrain tests, refocused from its baseline."""
    from .test_mmpretrain import trained_classifier
    c = trained_classifier(tmp_path_factory)
    compile_cfg = dict(backend=BACKEND)
    plain = train_recorded(c['baseline'], str(tmp_path / 'p'), compile_cfg, load_from=c['base'])
    eager = train_recorded(c['refconv'], str(tmp_path / 'e'), None, load_from=c['base'])
    compiled = train_recorded(c['refconv'], str(tmp_path / 'c'), compile_cfg,
                              load_from=c['base'])
    _check(plain, eager, compiled, rtol=1e-4, settles=True)


def test_layer_compiles_whole_under_amp_and_eval():
    """One RefConv model traced whole: no graph break in training, eval or under autocast, the
    eager results (forward and gradients), and one graph per (grad mode, autocast) state."""
    import torch.nn as nn
    from torch._dynamo.utils import counters

    from refconv_mm import RefConv2d
    torch.manual_seed(0)
    model = nn.Sequential(RefConv2d(3, 8, 3, padding=1, init='official'), nn.ReLU(),
                          RefConv2d(8, 8, 3, padding=1, groups=8, init='official'), nn.ReLU(),
                          RefConv2d(8, 4, 1, init='official'))
    compiled = torch.compile(model, backend=BACKEND)
    x = torch.randn(2, 3, 10, 10)
    torch._dynamo.reset()
    counters.clear()
    for amp in (False, True, False, True):
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
            for train in (True, False):
                model.train(train)
                with torch.set_grad_enabled(train):
                    want, got = model(x), compiled(x)
                assert got.dtype == want.dtype
                torch.testing.assert_close(got, want, rtol=0, atol=0)
                if train:
                    (want.float().sum()).backward()
                    g_want = [p.grad.clone() for p in model.parameters() if p.grad is not None]
                    model.zero_grad()
                    (got.float().sum()).backward()
                    g_got = [p.grad for p in model.parameters() if p.grad is not None]
                    for a, b in zip(g_got, g_want):
                        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
                    model.zero_grad()
    assert sum(counters['graph_break'].values()) == 0, dict(counters['graph_break'])
    assert counters['stats']['unique_graphs'] <= 4  # {train, eval} x {fp32, amp}, no more

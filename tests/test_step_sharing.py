"""A RefConv called several times per training step (a head shared by FPN levels) computes its
kernel once per step; gradients stay exactly those of a kernel computed per call."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import refconv_mm.refconv as refconv_module
from refconv_mm import RefConv2d
from refconv_mm.refocus import refocus_kernel

CALLS = 3  # the "levels" each step runs the shared conv on


class SharedHead(nn.Module):
    """One RefConv applied to every level, as mmdet's RetinaHead applies its convs."""

    def __init__(self, groups: int, reference: bool = False, ckpt: str = '') -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = RefConv2d(4, 4, 3, padding=1, groups=groups, init='official')
        self.reference, self.ckpt = reference, ckpt

    def level(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        if self.reference:  # the kernel computed afresh for every call: no sharing at all
            k = refocus_kernel(c.weight, c.refocus_weight)
            return F.conv2d(x, k, c.bias, c.stride, c.padding, c.dilation, c.groups)
        return c(x)

    def forward(self, xs):
        if self.ckpt:
            return sum(checkpoint(self.level, x, use_reentrant=self.ckpt == 'reentrant')
                       .square().mean() for x in xs)
        return sum(self.level(x).square().mean() for x in xs)


def levels(step: int):
    g = torch.Generator().manual_seed(step)
    return [torch.randn(2, 4, s, s, generator=g, requires_grad=True) for s in (8, 6, 4)]


def _count_calls(monkeypatch, module) -> list:
    """Record grad mode of every ``refocus_kernel`` call made through ``module``."""
    calls = []

    def counting(basis, weight):
        calls.append(torch.is_grad_enabled())
        return refocus_kernel(basis, weight)
    monkeypatch.setattr(module, 'refocus_kernel', counting)
    return calls


def count_kernels(monkeypatch) -> list:
    """Count the layer's kernel computations (the recompute for backward is not counted)."""
    return _count_calls(monkeypatch, refconv_module)


def count_recomputes(monkeypatch) -> list:
    """Count the kernels recomputed for backward."""
    import refconv_mm.refocus as refocus
    return _count_calls(monkeypatch, refocus)


def train_steps(model: nn.Module, steps: int, accumulate: int = 1):
    """SGD steps; returns per step (loss, refocus grad, input grads)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    out = []
    for step in range(steps):
        opt.zero_grad()
        loss_sum, x_grads = 0.0, []
        for micro in range(accumulate):
            xs = levels(10 * step + micro)
            loss = model(xs)
            loss.backward()
            loss_sum += loss.item()
            x_grads += [x.grad for x in xs]
        out.append((loss_sum, model.conv.refocus_weight.grad.clone(), x_grads))
        opt.step()
    return out


def assert_same_training(got, want):
    for (loss, grad, xg), (loss_r, grad_r, xg_r) in zip(got, want):
        torch.testing.assert_close(loss, loss_r, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad, grad_r, rtol=1e-5, atol=1e-7)
        for a, b in zip(xg, xg_r):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('groups', [1, 2, 4])
def test_one_kernel_per_step_and_same_gradients(monkeypatch, groups):
    want = train_steps(SharedHead(groups, reference=True), 3)
    calls, recomputes = count_kernels(monkeypatch), count_recomputes(monkeypatch)
    model = SharedHead(groups)
    got = train_steps(model, 3)
    assert_same_training(got, want)
    # step 1 learns the call count (a kernel per call), steps 2 and 3 compute one each
    assert calls == [True] * (CALLS + 2)
    # g=1 kernels are recomputed for backward (not kept), once per kernel; g>1 kernels are kept
    assert recomputes == ([False] * (CALLS + 2) if groups == 1 else [])
    assert model.conv._calls_per_step == CALLS
    assert model.conv._step_kernel is None  # released by the step's last call


def test_kernel_held_only_until_the_last_call_of_the_step():
    model = SharedHead(1)
    train_steps(model, 1)
    conv = model.conv
    xs = levels(5)
    outs = [conv(xs[0])]
    key, kernel, recompute, left = conv._step_kernel
    assert left == CALLS - 1 and kernel.grad_fn is not None
    outs.append(conv(xs[1]))
    assert conv._step_kernel[3] == 1 and conv._step_kernel[2] is recompute
    copy.deepcopy(model)  # a held kernel (with its graph) is not part of the module's state
    outs.append(conv(xs[2]))
    assert conv._step_kernel is None
    assert recompute.pending == CALLS and recompute.kernel is None  # nothing held in forward
    sum(o.sum() for o in outs).backward()
    assert recompute.pending == 0 and recompute.kernel is None  # dropped after the last use


@pytest.mark.parametrize('accumulate', [2, 3])
def test_gradient_accumulation(monkeypatch, accumulate):
    want = train_steps(SharedHead(1, reference=True), 3, accumulate)
    calls = count_kernels(monkeypatch)
    got = train_steps(SharedHead(1), 3, accumulate)
    assert_same_training(got, want)
    # backward ends each micro-batch's kernel: never reused across a backward
    assert len(calls) == CALLS + (3 * accumulate - 1)


def test_more_calls_than_learnt_and_two_forwards_before_backward(monkeypatch):
    model, ref = SharedHead(1), SharedHead(1, reference=True)
    train_steps(model, 1)
    train_steps(ref, 1)
    calls = count_kernels(monkeypatch)
    losses = []
    for m in (model, ref):
        m.zero_grad()
        xs, xs2 = levels(7), levels(8)
        loss = m(xs) + m(xs2)  # two forwards (2 x CALLS calls), one backward
        loss.backward()
        losses.append((loss.item(), m.conv.refocus_weight.grad.clone()))
    torch.testing.assert_close(losses[0][0], losses[1][0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(losses[0][1], losses[1][1], rtol=1e-5, atol=1e-7)
    assert len(calls) == 2  # one kernel per CALLS calls
    assert model.conv._calls_per_step == 2 * CALLS  # learnt for the next step


@pytest.mark.parametrize('ckpt', ['reentrant', 'non_reentrant'])
def test_activation_checkpointing(ckpt):
    want = train_steps(SharedHead(1, reference=True), 3)
    got = train_steps(SharedHead(1, ckpt=ckpt), 3)
    assert_same_training(got, want)


def test_frozen_layer_in_training_follows_its_weights(monkeypatch):
    """A frozen layer (frozen_stages) computes a no-grad kernel per call from the weights it
    holds then: nothing is kept across calls, so no write can leave it stale."""
    model = SharedHead(1)
    model.conv.refocus_weight.requires_grad_(False)
    xs = levels(0)
    want = SharedHead(1, reference=True)(xs).item()
    calls = count_kernels(monkeypatch)
    model.train()
    assert model(xs).item() == pytest.approx(want, rel=1e-6)
    assert len(calls) == CALLS  # a kernel per call, none kept
    model.conv.refocus_weight.data.add_(0.1)  # no version bump
    reference = SharedHead(1, reference=True)
    reference.conv.refocus_weight.data.add_(0.1)
    assert model(xs).item() == pytest.approx(reference(xs).item(), rel=1e-6)


def test_retinanet_head_shares_one_kernel_per_level_loop(monkeypatch):
    """mmdet's RetinaHead runs its stacked convs on 5 FPN levels: one kernel each per step,
    the same loss and refocusing gradients as a kernel per call."""
    from mmdet.registry import MODELS
    from mmdet.testing import demo_mm_inputs
    from mmdet.utils import register_all_modules
    from mmengine.hub import get_config
    register_all_modules()
    cfg = get_config('mmdet::retinanet/retinanet_r18_fpn_1x_coco.py').model
    refconv = dict(type='RefConv', init='official')
    cfg.neck.update(out_channels=32, conv_cfg=refconv)
    cfg.bbox_head.update(in_channels=32, feat_channels=32, stacked_convs=2, conv_cfg=refconv)
    torch.manual_seed(0)
    model = MODELS.build(cfg)
    model.train()
    reference = copy.deepcopy(model)
    data = model.data_preprocessor(demo_mm_inputs(2, (3, 96, 96), num_items=[3, 2],
                                                  num_classes=80), True)

    def step(m):
        m.zero_grad(set_to_none=True)
        losses = m(**data, mode='loss')
        loss = sum(v if torch.is_tensor(v) else sum(v) for v in losses.values())
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in m.named_parameters()
                             if n.endswith('refocus_weight') and p.grad is not None}

    head = [m for m in model.bbox_head.modules() if isinstance(m, RefConv2d)]
    assert len(head) == 4  # 2 cls + 2 reg convs
    step(model)  # learns each layer's calls per step
    assert {m._calls_per_step for m in head} == {5}
    calls, recomputes = count_kernels(monkeypatch), count_recomputes(monkeypatch)
    loss, grads = step(model)
    n_neck = sum(isinstance(m, RefConv2d) and m.refocus_weight.requires_grad
                 for m in model.neck.modules())
    assert len(calls) == n_neck + len(head)  # not n_neck + 5 * len(head)
    assert len(recomputes) == len(calls)  # all g=1: each kernel recomputed once in backward
    monkeypatch.setattr(refconv_module, '_in_backward', lambda: True)  # a kernel per call
    loss_ref, grads_ref = step(reference)
    assert loss == pytest.approx(loss_ref, rel=1e-6)
    assert grads.keys() == grads_ref.keys() and len(grads) > len(head)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-6,
                                   msg=name)

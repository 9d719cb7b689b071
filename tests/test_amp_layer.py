"""RefConv under autocast (AMP) and after EMA-style weight swaps, layer by layer.

The contract: under autocast a RefConv computes exactly what a plain conv holding its merged
fp32 kernel computes under autocast (bit for bit), forward and backward, train and eval, and
what it computes never depends on the context of an earlier call. bf16 on CPU exercises the
same autocast machinery as fp16 on a GPU.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn.bricks.conv_ws import conv_ws_2d

import refconv_mm.refocus as refocus_module
from refconv_mm import (RefConv2d, RefConv2dAdaptivePadding, RefConvWS2d, merge_refconv,
                        refocus_kernel)

AMP = dict(device_type='cpu', dtype=torch.bfloat16)


def _layer(variant: str) -> nn.Module:
    torch.manual_seed(0)
    if variant == 'grouped':
        layer = RefConv2d(4, 6, 3, padding=1, groups=2, init='official')
    elif variant == 'depthwise':
        layer = RefConv2d(6, 6, 3, padding=1, groups=6, init='official')
    elif variant == 'adaptive':
        layer = RefConv2dAdaptivePadding(4, 6, 3, stride=2, init='official')
    elif variant == 'ws':
        layer = RefConvWS2d(4, 6, 3, padding=1, init='official')
    else:  # 'g1', 'shared', 'frozen'
        layer = RefConv2d(4, 6, 3, padding=1, init='official')
    with torch.no_grad():  # a trained-looking basis and refocusing weights, bias included
        layer.weight.normal_()
        layer.bias.normal_()
        layer.refocus_weight.mul_(0.3)
    if variant == 'frozen':  # e.g. mmdet ResNet frozen_stages: the model froze it
        layer.refocus_weight.requires_grad_(False)
    return layer


VARIANTS = ['g1', 'grouped', 'depthwise', 'adaptive', 'ws', 'shared', 'frozen']
CALLS = {'shared': 3}  # calls per step (a head shared by FPN levels)


def _inputs(variant: str, step: int = 0):
    g = torch.Generator().manual_seed(step)
    cin = 6 if variant == 'depthwise' else 4
    return [torch.randn(2, cin, s, s, generator=g, requires_grad=True)
            for s in (9, 7, 5)[:CALLS.get(variant, 1)]]


def _reference(layer: RefConv2d, xs, per_call: bool = False):
    """Autograd through the layer's math, no saved-tensor hooks: one kernel for all calls, or
    (``per_call``) one per call, as a shared layer does before it learns its call count."""
    kernel = refocus_kernel(layer.weight, layer.refocus_weight)
    outs = []
    for x in xs:
        if per_call:
            kernel = refocus_kernel(layer.weight, layer.refocus_weight)
        if isinstance(layer, RefConvWS2d):
            outs.append(conv_ws_2d(x, kernel, layer.bias, layer.stride, layer.padding,
                                   layer.dilation, layer.groups, layer.eps))
            continue
        if isinstance(layer, RefConv2dAdaptivePadding):
            ph = max((-(-x.shape[-2] // 2) - 1) * 2 + 3 - x.shape[-2], 0)
            pw = max((-(-x.shape[-1] // 2) - 1) * 2 + 3 - x.shape[-1], 0)
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        outs.append(F.conv2d(x, kernel, layer.bias, layer.stride, layer.padding,
                             layer.dilation, layer.groups))
    return outs


def _loss(outs):
    return sum(o.float().square().mean() for o in outs)


@pytest.mark.parametrize('variant', VARIANTS)
def test_amp_train_forward_backward_equal_merged_and_autograd(variant):
    layer = _layer(variant).train()
    merged = merge_refconv(copy.deepcopy(layer))
    assert type(merged) is layer.plain_type
    for step in range(2):  # the second step uses the learnt call count (sharing)
        xs = _inputs(variant, step)
        with torch.autocast(**AMP):
            outs = [layer(x) for x in xs]
            with torch.no_grad():
                want = [merged(x) for x in xs]
        for o, w in zip(outs, want):
            assert o.dtype == w.dtype == torch.bfloat16
            assert torch.equal(o, w), (variant, (o.float() - w.float()).abs().max())
        _loss(outs).backward()
        x_grads = [x.grad.clone() for x in xs]
        r_grad = None if layer.refocus_weight.grad is None else layer.refocus_weight.grad.clone()
        # the reference: autograd through the same math, same autocast
        layer.refocus_weight.grad = None
        xs_ref = [x.detach().requires_grad_() for x in xs]
        with torch.autocast(**AMP):  # backward outside autocast, as torch recommends
            ref_loss = _loss(_reference(layer, xs_ref, per_call=step == 0))
        ref_loss.backward()
        for a, b in zip(x_grads, xs_ref):
            assert torch.equal(a, b.grad), variant
        if variant == 'frozen':
            assert r_grad is None and layer.refocus_weight.grad is None
        else:
            assert torch.equal(r_grad, layer.refocus_weight.grad), variant
        layer.refocus_weight.grad = None


@pytest.mark.parametrize('variant', VARIANTS)
def test_eval_kernel_never_depends_on_first_call_context(variant):
    """First call under autocast, then fp32 (mmengine's ValLoop without fp16): no dtype clash,
    and each call equals the merged conv in its own context."""
    layer = _layer(variant)
    merged = merge_refconv(copy.deepcopy(layer)).eval()
    x = _inputs(variant)[0].detach()
    for mode in ('train', 'eval'):  # train: a frozen layer's no-grad kernel; eval: validation
        layer.train(mode == 'train')
        ctx = torch.no_grad() if mode == 'eval' else torch.enable_grad()
        with ctx:
            with torch.autocast(**AMP):
                first = layer(x)
            second = layer(x)  # fp32, after an autocast call
            with torch.autocast(**AMP):
                third = layer(x)
        with torch.no_grad():
            with torch.autocast(**AMP):
                want_amp = merged(x)
            want_fp32 = merged(x)
        assert second.dtype == torch.float32 and torch.equal(second, want_fp32), (variant, mode)
        assert torch.equal(first, want_amp) and torch.equal(third, want_amp), (variant, mode)


def test_amp_keeps_g1_kernel_out_of_memory(monkeypatch):
    """g=1 under autocast: the conv saves a note, and backward recomputes the kernel once."""
    recomputes = []
    real = refocus_module.refocus_kernel

    def counting(basis, weight):
        recomputes.append(torch.is_grad_enabled())
        return real(basis, weight)
    monkeypatch.setattr(refocus_module, 'refocus_kernel', counting)
    layer = _layer('g1').train()
    x = _inputs('g1')[0]
    with torch.autocast(**AMP):
        y = layer(x)
    assert recomputes == []
    y.float().sum().backward()
    assert recomputes == [False]  # once, without grad: the bf16 kernel was not kept


def test_merge_state_dict_equals_layer_under_amp():
    """tools/merge_refconv.py's path (a bare state dict) gives the kernel the layer runs with."""
    from refconv_mm import merge_state_dict
    layer = _layer('g1').eval()
    plain = nn.Conv2d(4, 6, 3, padding=1).eval()
    plain.load_state_dict(merge_state_dict(layer.state_dict()))
    x = _inputs('g1')[0].detach()
    with torch.no_grad(), torch.autocast(**AMP):
        assert torch.equal(layer(x), plain(x))


@pytest.mark.parametrize('variant', ['g1', 'depthwise', 'ws'])
@pytest.mark.parametrize('target', ['refocus_weight', 'weight'])
def test_eval_sees_data_copy_writes(variant, target):
    """``p.data.copy_`` (EMAHook's swap) does not bump a version counter; eval must see it."""
    layer = _layer(variant).eval()
    x = _inputs(variant)[0].detach()
    with torch.no_grad():
        before = layer(x)
        new = getattr(layer, target).detach().clone().normal_()
        getattr(layer, target).data.copy_(new)
        after = layer(x)
        want = merge_refconv(copy.deepcopy(layer))(x)
    assert torch.equal(after, want) and not torch.equal(after, before)


def test_ema_hook_swap_in_eval():
    """mmengine's EMAHook swap itself, with a real ExpMomentumEMA of a RefConv model."""
    from mmengine.hooks import EMAHook
    ema = pytest.importorskip('mmdet.models.layers', reason='ExpMomentumEMA is mmdet\'s (RTMDet)')
    ExpMomentumEMA = ema.ExpMomentumEMA
    torch.manual_seed(0)
    model = nn.Sequential(_layer('g1'), nn.ReLU(), _layer('depthwise'))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    hook = EMAHook(ema_type='ExpMomentumEMA', momentum=0.5, gamma=1)
    hook.src_model, hook.ema_model = model, ExpMomentumEMA(model, momentum=0.5, gamma=1)
    x = torch.randn(2, 4, 9, 9)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        hook.ema_model.update_parameters(model)
    model.eval()
    with torch.no_grad():
        want = hook.ema_model.module.eval()(x)  # the EMA model's own output
        src_out = model(x)  # the source model's output, computed first (an old cache's bait)
        hook._swap_ema_parameters()  # the model now holds the EMA weights, the EMA copy ours
        ema_out = model(x)
        assert torch.isfinite(want).all() and torch.equal(ema_out, want)
        assert not torch.allclose(ema_out, src_out)
        hook._swap_ema_parameters()
        assert torch.equal(model(x), src_out)


@pytest.mark.parametrize('variant', ['g1', 'depthwise', 'shared'])
@pytest.mark.parametrize('use_reentrant', [False, True])
def test_amp_with_activation_checkpointing(variant, use_reentrant):
    """Activation checkpointing recomputes the forward in backward under the saved autocast
    state: the gradients are those of the same AMP step without checkpointing."""
    from torch.utils.checkpoint import checkpoint
    grads = []
    for ckpt in (False, True):
        layer = _layer(variant).train()
        xs = _inputs(variant)
        with torch.autocast(**AMP):
            outs = [checkpoint(layer, x, use_reentrant=use_reentrant) if ckpt else layer(x)
                    for x in xs]
        _loss(outs).backward()
        grads.append([x.grad for x in xs] + [layer.refocus_weight.grad])
    for a, b in zip(*grads):
        assert torch.equal(a, b), variant

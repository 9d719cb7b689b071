"""RefConv as an mmcv/mmengine conv type: building, freezing, caching, initialisation."""
import copy

import pytest
import torch
import torch.nn as nn
from mmcv.cnn import ConvModule, build_conv_layer
from mmengine.model import BaseModule
from mmengine.registry import MODELS

from refconv_mm import RefConv2d, RefConv2dAdaptivePadding, build_refconv, merge_refconv


@pytest.mark.parametrize('scope', [None, 'mmdet', 'mmseg'])
def test_registered_in_root_registry(scope):
    import importlib
    from mmengine.registry import DefaultScope
    name = f'refconv_scope_{scope}'
    if scope is None:
        assert MODELS.get('RefConv') is build_refconv and MODELS.get('RefConv2d') is RefConv2d
    else:
        DefaultScope.get_instance(name, scope_name=scope)
        reg = importlib.import_module(f'{scope}.registry').MODELS
        assert reg.get('RefConv') is build_refconv
    assert isinstance(build_conv_layer(dict(type='RefConv'), 4, 8, 3), RefConv2d)


def test_build_conv_layer_argument_forms():
    cfg = dict(type='RefConv')
    a = build_conv_layer(cfg, 4, 8, 3, stride=2, padding=1, dilation=1, groups=2, bias=False)
    b = build_conv_layer(cfg, 4, 8, kernel_size=3, stride=2, padding=1, bias=False)  # ResNet form
    c = build_conv_layer(dict(type='RefConv', map_k=1), in_channels=4, out_channels=8,
                         kernel_size=(1, 3))
    assert a.groups == 2 and a.bias is None and a.stride == (2, 2)
    assert b.kernel_size == (3, 3) and b.refocus_weight.shape == (32, 1, 3, 3)
    assert c.refocus_weight.shape == (32, 1, 1, 1)
    m = ConvModule(4, 8, 3, padding=1, conv_cfg=cfg, norm_cfg=dict(type='BN'))
    assert isinstance(m.conv, RefConv2d) and m.conv.bias is None  # bias='auto' resolved
    m.init_weights()
    assert m(torch.randn(1, 4, 6, 6)).shape == (1, 8, 6, 6)


def test_exposes_conv_attributes_and_plain_keys():
    layer = RefConv2d(4, 8, 3, 2, 1, 1, 1, True)
    for attr, want in dict(in_channels=4, out_channels=8, kernel_size=(3, 3), stride=(2, 2),
                           padding=(1, 1), dilation=(1, 1), groups=1, transposed=False,
                           output_padding=(0, 0)).items():
        assert getattr(layer, attr) == want, attr
    assert set(layer.state_dict()) == {'weight', 'bias', 'refocus_weight'}
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    plain = nn.Conv2d(4, 8, 3, 2, 1)
    missing, unexpected = layer.load_state_dict(plain.state_dict(), strict=False)
    assert missing == ['refocus_weight'] and unexpected == []
    assert torch.equal(layer.weight, plain.weight) and layer.basis_loaded


@pytest.mark.parametrize('kwargs,match', [
    (dict(transposed=True), 'transposed'),
    (dict(output_padding=1), 'output_padding'),
    (dict(map_k=2), 'map_k=2'),
    (dict(map_k=0), 'map_k=0'),
    (dict(map_k=-3), 'map_k=-3'),
    (dict(groups=3), 'in_channels=4 is not divisible by groups=3'),
    (dict(init='xavier'), "init='xavier'"),
])
def test_bad_arguments_fail_at_build(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_conv_layer(dict(type='RefConv', **kwargs), 4, 6, 3)


def test_out_channels_not_divisible():
    with pytest.raises(ValueError, match='out_channels=6 is not divisible by groups=4'):
        RefConv2d(8, 6, 3, groups=4)


@pytest.mark.parametrize('mode', ['zeros', 'reflect', 'replicate', 'circular'])
def test_padding_modes(mode):
    torch.manual_seed(0)
    layer = RefConv2d(3, 4, 3, padding=1, padding_mode=mode, init='official')
    plain = nn.Conv2d(3, 4, 3, padding=1, padding_mode=mode)
    with torch.no_grad():
        plain.weight.copy_(layer.refocused_kernel())
        plain.bias.copy_(layer.bias)
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(layer(x), plain(x), atol=1e-5, rtol=1e-5)
    layer.eval()
    torch.testing.assert_close(layer(x), plain(x), atol=1e-5, rtol=1e-5)


def test_padding_same_string():
    layer = RefConv2d(3, 4, 3, padding='same', init='official')
    x = torch.randn(1, 3, 8, 8)
    assert layer(x).shape == (1, 4, 8, 8)


def test_zero_init_starts_at_pretrained_function():
    layer = RefConv2d(3, 4, 3, padding=1)
    plain = nn.Conv2d(3, 4, 3, padding=1)
    layer.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(layer(x), plain(x))
    off = RefConv2d(3, 4, 3, padding=1, init='official')
    assert off.refocus_weight.abs().sum() > 0


def test_optimizer_never_changes_basis():
    torch.manual_seed(0)
    model = nn.Sequential(RefConv2d(3, 8, 3, padding=1), nn.ReLU(),
                          RefConv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 2, 1))
    basis = {k: v.clone() for k, v in model.state_dict().items()
             if not k.endswith('refocus_weight')}
    refocus = [m.refocus_weight.clone() for m in model if isinstance(m, RefConv2d)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 3, 8, 8)).square().mean().backward()
        opt.step()
    sd = model.state_dict()
    for k in ('0.weight', '0.bias', '2.weight', '2.bias'):
        assert torch.equal(sd[k], basis[k]), k
    assert not torch.equal(sd['3.weight'], basis['3.weight'])  # plain conv trains
    for m, before in zip([m for m in model if isinstance(m, RefConv2d)], refocus):
        assert not torch.equal(m.refocus_weight, before)


def test_no_grad_kernel_follows_every_write():
    """Without grad the kernel is computed from the weights held now, whatever wrote them."""
    torch.manual_seed(0)
    layer = RefConv2d(3, 4, 3, padding=1, init='official')
    x = torch.randn(1, 3, 8, 8)

    def want():
        return nn.functional.conv2d(x.to(layer.weight.dtype), layer.refocused_kernel(),
                                    layer.bias, 1, 1)
    layer.eval()
    with torch.no_grad():
        y0 = layer(x)
        torch.testing.assert_close(y0, want(), rtol=0, atol=0)
    # load_state_dict
    other = RefConv2d(3, 4, 3, padding=1, init='official')
    layer.load_state_dict(other.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(layer(x), other.eval()(x))
    # a training step
    layer.train()
    opt = torch.optim.SGD(layer.parameters(), lr=1.0)
    layer(x).sum().backward()
    opt.step()
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want(), rtol=0, atol=0)
        # in place, through the parameter or around autograd's version counter (.data)
        layer.refocus_weight.add_(0.5)
        torch.testing.assert_close(layer(x), want(), rtol=0, atol=0)
        layer.refocus_weight.data.mul_(0.5)
        layer.weight.data.copy_(torch.randn_like(layer.weight))
        torch.testing.assert_close(layer(x), want(), rtol=0, atol=0)
        # .to(): new storage, new dtype
        layer.double()
        assert layer(x.double()).dtype == torch.float64
        torch.testing.assert_close(layer(x.double()), want(), rtol=0, atol=0)
    assert not torch.allclose(y0.double(), layer(x.double()))


def test_keeps_own_init_under_init_cfg():
    class Head(BaseModule):
        def __init__(self):
            super().__init__(init_cfg=dict(type='Normal', layer='Conv2d', std=0.01))
            self.conv = ConvModule(4, 4, 3, padding=1, conv_cfg=dict(type='RefConv'))
            self.conv2 = build_conv_layer(dict(type='RefConv', init='zero'), 4, 4, 3)
    head = Head()
    head.init_weights()
    assert head.conv.conv.refocus_weight.abs().sum() == 0
    assert head.conv2.refocus_weight.abs().sum() == 0


def test_deepcopy_and_pickle_roundtrip():
    layer = RefConv2d(3, 4, 3, init='official').eval()
    x = torch.randn(1, 3, 5, 5)
    with torch.no_grad():
        y = layer(x)
        clone = copy.deepcopy(layer)
        torch.testing.assert_close(clone(x), y)


def test_spatial_only_keeps_1x1_plain():
    """The official selection in the one-line override: 1x1 convs are built as nn.Conv2d."""
    cfg = dict(type='RefConv', spatial_only=True, map_k=3, init='official')
    one = build_conv_layer(cfg, 4, 8, 1, bias=False)
    pair = build_conv_layer(cfg, 4, 8, kernel_size=(1, 1), stride=2)
    dw = build_conv_layer(cfg, 8, 8, 3, padding=1, groups=8)
    strip = build_conv_layer(cfg, 8, 8, (1, 3), padding=(0, 1))
    assert type(one) is nn.Conv2d and one.bias is None and one.weight.requires_grad
    assert type(pair) is nn.Conv2d and pair.stride == (2, 2)
    assert isinstance(dw, RefConv2d) and dw.init == 'official'
    assert isinstance(strip, RefConv2d)  # a spatial kernel along one axis is refocused
    assert isinstance(build_conv_layer(dict(type='RefConv'), 4, 8, 1), RefConv2d)
    with pytest.raises(ValueError, match='transposed'):
        build_conv_layer(cfg, 4, 8, 1, transposed=True)


@pytest.mark.parametrize('size', [(15, 16), (17, 17), (32, 31)])
@pytest.mark.parametrize('stride,dilation', [(1, 1), (2, 1), (2, 2)])
def test_adaptive_padding_variant_matches_mmcv(size, stride, dilation):
    """RefConv of Conv2dAdaptivePadding pads as mmcv does, for every input size; merges back."""
    from mmcv.cnn.bricks.conv2d_adaptive_padding import Conv2dAdaptivePadding
    torch.manual_seed(0)
    layer = RefConv2dAdaptivePadding(4, 6, 3, stride, 0, dilation, 2, True, init='official')
    plain = Conv2dAdaptivePadding(4, 6, 3, stride, 0, dilation, 2, True)
    with torch.no_grad():
        plain.weight.copy_(layer.refocused_kernel())
        plain.bias.copy_(layer.bias)
    x = torch.randn(2, 4, *size)
    torch.testing.assert_close(layer(x), plain(x), atol=1e-6, rtol=1e-5)
    merged = merge_refconv(layer)
    assert type(merged) is Conv2dAdaptivePadding
    torch.testing.assert_close(merged(x), plain(x), atol=1e-6, rtol=1e-5)


def test_weight_standardised_variant_matches_mmcv():
    """RefConv of ConvWS2d standardises the refocused kernel: same outputs and grads; merges back."""
    from mmcv.cnn import ConvWS2d
    from refconv_mm import RefConvWS2d
    torch.manual_seed(0)
    layer = RefConvWS2d(4, 6, 3, 1, 1, 1, 2, True, eps=1e-4, init='official').double()
    plain = ConvWS2d(4, 6, 3, 1, 1, 1, 2, True, eps=1e-4).double()
    kernel = layer.refocused_kernel()
    with torch.no_grad():
        plain.weight.copy_(kernel)
        plain.bias.copy_(layer.bias)
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    out = layer(x)
    torch.testing.assert_close(out, plain(x), atol=1e-12, rtol=1e-10)
    out.square().sum().backward()
    assert layer.refocus_weight.grad is not None and layer.weight.grad is None
    layer.eval()
    torch.testing.assert_close(layer(x), plain(x), atol=1e-12, rtol=1e-10)
    merged = merge_refconv(layer)
    assert type(merged) is ConvWS2d and merged.eps == 1e-4
    torch.testing.assert_close(merged(x), plain(x), atol=1e-12, rtol=1e-10)


def test_onnx_export_of_unmerged_layer_is_refused(tmp_path):
    """Exported unmerged, the refocusing transform would run at inference: refused, with the fix."""
    import inspect
    # the TorchScript exporter: torch >= 2.9 defaults to dynamo; torch < 2.5 has no such argument
    kw = dict(dynamo=False) if 'dynamo' in inspect.signature(torch.onnx.export).parameters else {}
    model = nn.Sequential(RefConv2d(3, 4, 3, padding=1)).eval()
    with pytest.raises(RuntimeError, match='tools/merge_refconv.py'):
        torch.onnx.export(model, (torch.randn(1, 3, 8, 8),), str(tmp_path / 'm.onnx'), **kw)
    merged = merge_refconv(model)
    import importlib.util
    if importlib.util.find_spec('onnx') is None:  # torch 2.0's exporter imports it to write
        pytest.skip('exporting the merged model needs the onnx package here; not installed')
    torch.onnx.export(merged, (torch.randn(1, 3, 8, 8),), str(tmp_path / 'm.onnx'), **kw)
    assert (tmp_path / 'm.onnx').stat().st_size > 0

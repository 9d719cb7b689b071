"""RefConv's math against an independent, loop-by-loop reference of the seed formula."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from refconv_mm import RefConv2d
from refconv_mm.refocus import refocus_kernel, refocus_map_size, refocus_weight_shape


def reference_kernel(basis: np.ndarray, m: np.ndarray) -> np.ndarray:
    """W_b + T(W_b), written out: T groups g consecutive 2-D kernels, zero padding m//2."""
    cout, cin_g, kh, kw = basis.shape
    n, g, mh, mw = m.shape
    flat = basis.reshape(n, kh, kw).astype(np.float64)
    out = flat.copy()
    for k in range(n):
        group = k // g
        for c in range(g):
            src = flat[group * g + c]
            for y in range(kh):
                for x in range(kw):
                    acc = 0.0
                    for dy in range(mh):
                        for dx in range(mw):
                            yy, xx = y + dy - mh // 2, x + dx - mw // 2
                            if 0 <= yy < kh and 0 <= xx < kw:
                                acc += m[k, c, dy, dx] * src[yy, xx]
                    out[k, y, x] += acc
    return out.reshape(basis.shape)


def reference_conv(x, layer: RefConv2d) -> torch.Tensor:
    k = reference_kernel(layer.weight.detach().numpy(), layer.refocus_weight.detach().numpy())
    return F.conv2d(x.double(), torch.from_numpy(k), None if layer.bias is None else
                    layer.bias.detach().double(), layer.stride, layer.padding, layer.dilation,
                    layer.groups).float()


CASES = [
    # cin, cout, kernel, stride, padding, dilation, groups, bias
    (4, 6, 3, 1, 1, 1, 1, False),     # regular 3x3
    (4, 6, 1, 1, 0, 1, 1, True),      # 1x1 (map capped to 1x1)
    (3, 5, 5, 2, 2, 1, 1, True),      # 5x5, stride
    (3, 4, 7, 2, 3, 1, 1, False),     # 7x7 stem-like
    (4, 8, 3, 1, 2, 2, 1, True),      # dilation
    (8, 8, 3, 1, 1, 1, 2, False),     # grouped
    (8, 12, 3, 2, 1, 1, 4, True),     # grouped, stride
    (6, 6, 3, 1, 1, 1, 6, False),     # depthwise
    (6, 6, 5, 1, 2, 1, 6, True),      # depthwise 5x5
    (4, 6, (1, 7), 1, (0, 3), 1, 1, False),  # non-square
    (4, 6, (3, 5), 1, (1, 2), 1, 2, True),   # non-square grouped
    (4, 4, 2, 1, 0, 1, 1, False),     # even kernel: map capped to 1
    (8, 12, 1, 1, 0, 1, 4, True),     # grouped 1x1 (1x1 map: a g x g product per group)
    (6, 6, 1, 1, 0, 1, 6, False),     # depthwise 1x1
]


@pytest.mark.parametrize('cin,cout,k,s,p,d,g,bias', CASES)
@pytest.mark.parametrize('map_k', [3, 1])
def test_refconv_matches_reference(cin, cout, k, s, p, d, g, bias, map_k):
    torch.manual_seed(0)
    layer = RefConv2d(cin, cout, k, s, p, d, g, bias, map_k=map_k, init='official')
    with torch.no_grad():
        layer.weight.normal_()
        if bias:
            layer.bias.normal_()
    x = torch.randn(2, cin, 11, 13)
    want = reference_conv(x, layer)
    layer.train()
    got_train = layer(x)
    layer.eval()
    got_eval = layer(x)
    torch.testing.assert_close(got_train, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_eval, want, atol=1e-5, rtol=1e-5)


def test_depthwise_mixes_all_channels():
    """For a depthwise conv, every channel's kernel is refocused from all channels' kernels."""
    layer = RefConv2d(4, 4, 3, padding=1, groups=4, bias=False)
    assert layer.refocus_weight.shape == (4, 4, 3, 3)
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[3].fill_(1.0)             # only channel 3 has a kernel
        layer.refocus_weight.fill_(0.1)
    k = layer.refocused_kernel()
    assert (k[0].abs() > 0).all()              # channel 0 now sees channel 3's kernel


def test_regular_conv_refocuses_each_kernel_alone():
    layer = RefConv2d(2, 2, 3, padding=1, bias=False)
    assert layer.refocus_weight.shape == (4, 1, 3, 3)
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[1, 1].fill_(1.0)
        layer.refocus_weight.fill_(0.1)
    k = layer.refocused_kernel()
    assert k[0].abs().sum() == 0 and k[1, 0].abs().sum() == 0


@pytest.mark.parametrize('k,map_k,want', [((3, 3), 3, (3, 3)), ((1, 1), 3, (1, 1)),
                                          ((7, 7), 5, (5, 5)), ((1, 7), 3, (1, 3)),
                                          ((2, 4), 3, (1, 3)), ((5, 5), 1, (1, 1))])
def test_map_size_rule(k, map_k, want):
    assert refocus_map_size(k, map_k) == want


@pytest.mark.parametrize('basis_trainable', [True, False])
def test_refocused_backward_matches_autograd(basis_trainable):
    # g=1 recomputes the kernel in backward, g>1 keeps it; the basis frozen or trainable.
    torch.manual_seed(0)
    for g, cin, cout in ((1, 4, 6), (2, 4, 6), (6, 6, 6)):
        layer = RefConv2d(cin, cout, 3, 2, 1, 1, g, True, init='official').double()
        layer.weight.requires_grad_(basis_trainable)
        layer.bias.requires_grad_(True)
        x = torch.randn(2, cin, 9, 9, dtype=torch.double, requires_grad=True)
        assert torch.autograd.gradcheck(layer, (x,))
        params = [x, layer.refocus_weight, layer.bias] + [layer.weight] * basis_trainable
        fast = torch.autograd.grad(layer(x).square().sum(), params)
        slow = torch.autograd.grad(F.conv2d(x, layer.refocused_kernel(), layer.bias, 2, 1, 1,
                                            g).square().sum(), params)
        for a, b in zip(fast, slow):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize('groups,k', [(1, 1), (1, 3), (4, 3)])
def test_refocus_kernel_casts_weights_to_the_basis_dtype(groups, k):
    # Mixed precision: a bf16 basis with fp32 refocusing weights gives a bf16 kernel and an
    # fp32 gradient; equal dtypes take the same path with no cast.
    torch.manual_seed(0)
    basis = torch.randn(8, 8 // groups, k, k)
    r = torch.randn(refocus_weight_shape(8, 8, groups, (k, k), 3), requires_grad=True)
    kernel = refocus_kernel(basis.bfloat16(), r)
    assert kernel.dtype == torch.bfloat16
    want = refocus_kernel(basis.bfloat16(), r.detach().bfloat16())
    torch.testing.assert_close(kernel, want)
    kernel.float().sum().backward()
    assert r.grad.dtype == torch.float32
    r32 = r.detach().clone().requires_grad_()
    refocus_kernel(basis, r32).sum().backward()
    torch.testing.assert_close(r.grad, r32.grad, rtol=2e-2, atol=2e-2)


def test_refocus_kernel_rejects_mismatch():
    with pytest.raises(ValueError, match='does not fit'):
        refocus_kernel(torch.zeros(4, 2, 3, 3), torch.zeros(7, 1, 3, 3))


@pytest.mark.parametrize('groups,calls', [(1, 2), (4, 1)])
def test_kernel_recomputed_only_where_it_is_large(monkeypatch, groups, calls):
    # g=1: not kept after forward, recomputed in backward (memory); g>1: kept (saves a pass).
    import weakref

    import refconv_mm.refocus as refocus
    kernels = []
    real = refocus.refocus_kernel

    def counting(*args):
        kernel = real(*args)
        kernels.append(weakref.ref(kernel))
        return kernel

    import refconv_mm.refconv as refconv
    monkeypatch.setattr(refocus, 'refocus_kernel', counting)  # the recompute
    monkeypatch.setattr(refconv, 'refocus_kernel', counting)  # the layer's forward
    layer = RefConv2d(8, 8, 3, padding=1, groups=groups, init='official')
    out = layer(torch.randn(1, 8, 6, 6))
    assert (kernels[0]() is None) == (groups == 1)
    out.sum().backward()
    assert len(kernels) == calls
    assert layer.refocus_weight.grad is not None and layer.weight.grad is None

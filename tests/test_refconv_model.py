"""RefConvModel, the config form of the whole-model route: what reaches the inner model."""
import pytest
import torch
from mmengine.hub import get_config
from mmengine.registry import MODELS, init_default_scope
from mmengine.runner import Runner

import refconv_mm  # noqa: F401
from refconv_mm import RefConv2d
from refconv_mm.config import plain_config
from refconv_mm.convert import split_refconv_model


def test_split_passes_added_keys_to_the_inner_model():
    inner = dict(type='M', backbone=dict(depth=18), data_preprocessor=dict(type='Own'))
    cfg = dict(type='RefConvModel', model=inner, include='backbone', map_k=1, init='official',
               data_preprocessor=dict(type='Injected'), train_cfg=None, pretrained=None)
    model, options = split_refconv_model(cfg)
    assert options == dict(include='backbone', map_k=1, init='official')
    # the Runner's injection never replaces the model's own preprocessor (Runner.setdefault)
    assert model['data_preprocessor'] == dict(type='Own')
    assert model['train_cfg'] is None and model['pretrained'] is None  # mmseg init_model's keys
    assert 'type' in model and model['type'] == 'M' and inner == dict(
        type='M', backbone=dict(depth=18), data_preprocessor=dict(type='Own'))  # not modified
    model, _ = split_refconv_model(dict(type='RefConvModel', model=dict(type='M'),
                                        data_preprocessor=dict(type='Injected')))
    assert model['data_preprocessor'] == dict(type='Injected')


@pytest.mark.parametrize('cfg', [dict(type='RefConvModel'),
                                 dict(type='RefConvModel', model='mmdet::retinanet')])
def test_missing_model_is_a_clear_error(cfg):
    with pytest.raises(ValueError, match=r"RefConvModel: 'model' must be the original model "
                                         r'dict, e\.g\. model = dict\(_delete_=True'):
        MODELS.build(cfg)


def test_runner_injects_data_preprocessor_into_mmpretrain_model(tmp_path):
    """mmpretrain configs keep data_preprocessor at top level; the Runner injects it."""
    cfg = get_config('mmpretrain::resnet/resnet18_8xb32_in1k.py')
    assert 'data_preprocessor' not in cfg.model
    wrapped = dict(type='RefConvModel', model=cfg.model, include='backbone.layer4')
    runner = Runner(model=wrapped, work_dir=str(tmp_path), default_scope='mmpretrain',
                    data_preprocessor=cfg.data_preprocessor)
    model = runner.model
    assert type(model).__name__ == 'ImageClassifier'
    want = torch.tensor(cfg.data_preprocessor['mean']).view(-1, 1, 1)
    torch.testing.assert_close(model.data_preprocessor.mean, want)
    refconvs = [n for n, m in model.named_modules() if isinstance(m, RefConv2d)]
    assert refconvs and all(n.startswith('backbone.layer4.') for n in refconvs)
    assert not any(m.basis_loaded for m in model.modules() if isinstance(m, RefConv2d))


def test_plain_config_unwraps_the_model(tmp_path):
    cfg = get_config('mmpretrain::resnet/resnet18_8xb32_in1k.py')
    cfg.model = dict(type='RefConvModel', model=cfg.model, spatial_only=True,
                     data_preprocessor=dict(type='ClsDataPreprocessor', num_classes=7))
    cfg.custom_hooks = [dict(type='RefConvHook')]
    plain = plain_config(cfg)
    assert plain.model.type == 'ImageClassifier' and plain.custom_hooks == []
    assert plain.model.data_preprocessor.num_classes == 7
    init_default_scope('mmpretrain')
    assert not any(isinstance(m, RefConv2d) for m in MODELS.build(plain.model).modules())


def test_partly_selected_shared_conv_is_refused():
    """Selecting one name of a shared conv would untie it from the other: a clear error."""
    shared = torch.nn.Conv2d(3, 3, 3)
    model = torch.nn.ModuleDict(dict(a=torch.nn.Sequential(shared), b=torch.nn.Sequential(shared)))
    with pytest.raises(ValueError, match=r"'b\.0' is the same conv as a selected module"):
        refconv_mm.convert_to_refconv(model, exclude='b')
    assert type(model['a'][0]) is torch.nn.Conv2d  # nothing converted
    refconv_mm.convert_to_refconv(model, include=['a', 'b'])
    assert isinstance(model['a'][0], RefConv2d) and model['a'][0] is model['b'][0]


def test_max_output_diff_refuses_different_shapes():
    from refconv_mm.verify import max_output_diff

    class Out(torch.nn.Module):
        def __init__(self, n):
            super().__init__()
            self.n = n

        def forward(self, x, samples, mode):
            return torch.ones(self.n, 4)

    with pytest.raises(RuntimeError, match='different shapes'):
        max_output_diff(Out(1), Out(5))
    assert max_output_diff(Out(2), Out(2)) == (0.0, 1.0)

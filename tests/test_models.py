"""The HRNet-C family in timm's registry: architecture, timm model contract, existing weights."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F

import hrnet_cls
from conftest import tiny_model
from hrnet_cls.models.inference import count_macs
from hrnet_cls.models.hrnet_c import TIMM_TWINS
from hrnet_cls.models.weights import init_from

TINY = 'hrnet_tiny_c'


def tiny(**kwargs) -> torch.nn.Module:
    return tiny_model(kwargs.pop('num_classes', 10), seed=None, **kwargs)


def calibrated(model: torch.nn.Module, size: int = 64) -> torch.nn.Module:
    """Give BN realistic running stats (a few train-mode batches), then eval."""
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, size, size))
    return model.eval()


def test_registry_holds_exactly_our_family_and_timm_keeps_its_own():
    assert set(timm.list_models('hrnet*_c*')) == set(hrnet_cls.VARIANTS)  # the one table in hrnet_c.py
    for name in ('hrnet_w18', 'hrnet_w18_small', 'hrnet_w44'):
        assert timm.models.model_entrypoint(name).__module__ == 'timm.models.hrnet'
    assert timm.models.model_entrypoint('hrnet_w44_c').__module__ == 'hrnet_cls.models.hrnet_c'


def test_registering_refuses_to_replace_a_model_someone_else_registered():
    from hrnet_cls.models.hrnet_c import _register

    def resnet18(pretrained=False, **kwargs):  # timm's own name, from another module
        raise AssertionError('never registered, never called')

    with pytest.raises(RuntimeError, match="'resnet18' is already registered by timm.models.resnet"):
        _register(resnet18)
    assert timm.models.model_entrypoint('resnet18').__module__ == 'timm.models.resnet'


SLOW = pytest.mark.slow  # a full-size model at 224 px


@pytest.mark.parametrize('name', [n if v.gflops < 3 else pytest.param(n, marks=SLOW)
                                  for n, v in sorted(hrnet_cls.VARIANTS.items())])
def test_params_and_gflops_match_the_paper_table(name):
    params, gflops = hrnet_cls.VARIANTS[name].params, hrnet_cls.VARIANTS[name].gflops
    model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == params
    measured = count_macs(model) / 2**30
    assert abs(measured - gflops) / gflops < 0.01, measured


def test_macs_counter_counts_a_known_conv():
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2, 1), torch.nn.Flatten(), torch.nn.Linear(8 * 16 * 16, 5))
    assert count_macs(conv, (3, 32, 32)) == 8 * 16 * 16 * 3 * 9 + 8 * 16 * 16 * 5


def test_pretrained_cfg_is_timm_shaped():
    model = timm.create_model('hrnet_w18_c')
    cfg = model.pretrained_cfg
    assert cfg['input_size'] == (3, 224, 224) and cfg['crop_pct'] == 0.875
    assert cfg['interpolation'] == 'bilinear' and cfg['first_conv'] == 'conv1' and cfg['classifier'] == 'classifier'
    assert cfg['hf_hub_id'] == 'timm/hrnet_w18.ms_in1k'
    assert model.default_cfg == cfg
    data_cfg = timm.data.resolve_data_config({}, model=model)
    assert data_cfg['mean'] == timm.data.IMAGENET_DEFAULT_MEAN


def test_head_contract_num_classes_pool_and_pre_logits():
    model = tiny().eval()
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 10)
    feats = model.forward_features(x)
    assert feats.shape == (2, 256, 1, 1)
    assert model.forward_head(feats, pre_logits=True).shape == (2, 256)
    assert tiny(num_classes=0)(x).shape == (2, 256)
    assert isinstance(model.get_classifier(), torch.nn.Linear)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.num_classes == 3
    model.reset_classifier(0)
    assert model(x).shape == (2, 256)
    assert timm.create_model(TINY, num_classes=0, global_pool='')(x).shape == (2, 256, 1, 1)
    assert timm.create_model(TINY, in_chans=1, num_classes=4)(torch.randn(2, 1, 32, 32)).shape == (2, 4)


def test_drop_rate_and_drop_path_are_active_only_in_training():
    model = tiny(drop_rate=0.5, drop_path_rate=0.2)
    drop_paths = [m for m in model.modules() if type(m).__name__ == 'DropPath']
    assert drop_paths and max(m.drop_prob for m in drop_paths) == pytest.approx(0.2)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(1)
    assert not torch.equal(a, model(x))
    model.eval()
    assert torch.equal(model(x), model(x))
    assert not [m for m in tiny().modules() if type(m).__name__ == 'DropPath']  # default 0


def test_odd_input_sizes_work():
    model = tiny().eval()
    for size in (40, 50, 33):
        assert model(torch.randn(1, 3, size, size)).shape == (1, 10)


def test_group_matcher_drives_timm_layer_decay_grouping():
    from timm.optim import param_groups_layer_decay
    groups = param_groups_layer_decay(tiny(), layer_decay=0.5)
    scales = sorted({g['lr_scale'] for g in groups})
    assert len(scales) > 3
    names = tiny().group_matcher()
    assert set(names) == {'stem', 'blocks'}


def test_forward_intermediates_and_features_only():
    model = tiny().eval()
    x = torch.randn(2, 3, 64, 64)
    final, inter = model.forward_intermediates(x)
    assert torch.allclose(final, model.forward_features(x))
    assert [t.shape[1] for t in inter] == [16, 32, 64, 128, 256]
    assert [64 // t.shape[-1] for t in inter] == [2, 4, 8, 16, 32]
    only = model.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
    assert [t.shape[1] for t in only] == [32, 128]
    feats = timm.create_model(TINY, features_only=True, out_indices=(0, 2, 4)).eval()
    assert feats.feature_info.channels() == [16, 64, 256]
    assert feats.feature_info.reduction() == [2, 8, 32]
    out = feats(x)
    assert [t.shape[1:] for t in out] == [(16, 32, 32), (64, 8, 8), (256, 2, 2)]
    full = timm.create_model('hrnet_w18_c', features_only=True)
    assert full.feature_info.channels() == [64, 128, 256, 512, 1024]
    assert full.feature_info.reduction() == [2, 4, 8, 16, 32]


def test_grad_checkpointing_gives_identical_gradients_and_buffers():
    torch.manual_seed(0)
    plain = tiny(drop_path_rate=0.1)
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    for model in (plain, ckpt):
        torch.manual_seed(1)  # same drop-path draws
        F.cross_entropy(model(x), y).backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.equal(p.grad, q.grad), name
    for (name, b), c in zip(plain.named_buffers(), ckpt.buffers()):
        assert torch.equal(b, c), name  # BN running stats updated once, not twice


@pytest.mark.slow  # a dynamo + AOT autograd trace of the whole model: ~30 s
def test_grad_checkpointing_under_compile_trains_and_updates_batchnorm_once():
    """train.compile with model.grad_checkpointing: dynamo refuses checkpoint's context_fn, so the
    compiled forward takes the plain checkpoint, whose recompute must not update BN twice."""
    torch.manual_seed(0)
    plain = tiny()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    F.cross_entropy(plain(x), y).backward()
    F.cross_entropy(torch.compile(ckpt, backend="aot_eager", fullgraph=True)(x), y).backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
    for (name, b), c in zip(plain.named_buffers(), ckpt.buffers()):
        torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-6, msg=name)  # num_batches_tracked 1, not 2


def test_internal_nhwc_layout_matches_nchw_and_any_input_layout():
    torch.manual_seed(0)
    nhwc = calibrated(tiny())
    nchw = timm.create_model(TINY, num_classes=10, channels_last=False).eval()
    nchw.load_state_dict(nhwc.state_dict())
    assert nhwc.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64)
    ref = nchw(x)
    assert nchw.forward_features(x).is_contiguous()
    assert nhwc.forward_features(x).is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(nhwc(x), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(nhwc(x.contiguous(memory_format=torch.channels_last)), ref, rtol=1e-4, atol=1e-4)


def test_torchscript_and_export_match_eager():
    model = calibrated(tiny())
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    scripted = torch.jit.script(model)
    torch.testing.assert_close(scripted(x), ref)
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), ref)


@pytest.mark.slow
def test_torch_compile_matches_eager():
    model = calibrated(tiny())
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    compiled = torch.compile(model)
    torch.testing.assert_close(compiled(x), ref, rtol=1e-4, atol=1e-4)


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match='bogus'):
        timm.create_model(TINY, bogus=1)
    with pytest.raises(ValueError, match='num_classes'):
        timm.create_model(TINY, num_classes=-1)
    with pytest.raises(ValueError, match='in_chans'):
        timm.create_model(TINY, in_chans=0)
    with pytest.raises(ValueError, match='drop_path_rate'):
        timm.create_model(TINY, drop_path_rate=1.5)
    with pytest.raises(ValueError, match='out_indices'):
        timm.create_model(TINY, features_only=True, out_indices=(0, 5))
    with pytest.raises(ValueError, match='feature_location'):
        timm.create_model(TINY, features_only=True, feature_location='stage4')


def test_overrides_never_leak_into_the_next_model():
    timm.create_model(TINY, num_classes=3, drop_path_rate=0.3, in_chans=1)
    model = timm.create_model(TINY)
    assert model.num_classes == 1000 and model.conv1.in_channels == 3
    assert not [m for m in model.modules() if type(m).__name__ == 'DropPath']
    assert hrnet_cls.MODEL_CFGS[TINY].widths == (4, 8, 16, 32)


def test_pretrained_without_weights_or_network_is_a_clear_error(monkeypatch):
    with pytest.raises(RuntimeError, match='No pretrained weights exist for hrnet_w44_c'):
        timm.create_model('hrnet_w44_c', pretrained=True)
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)  # read at import: patch the value
    with pytest.raises(RuntimeError, match='hrnet_w18_small_c: pretrained weights could not be loaded'):
        timm.create_model('hrnet_w18_small_c', pretrained=True)


# --- existing weights: timm's hrnet_wXX checkpoints load into ours and give the same logits ---

@pytest.fixture(scope='module')
def timm_checkpoints(tmp_path_factory):
    """timm_checkpoints(name): a randomly initialised timm model (BN calibrated) saved plain and
    wrapped, as users hold them; made on first use, so the fast lane builds only what it runs."""
    made, root = {}, tmp_path_factory.mktemp('weights')

    def get(theirs: str):
        if theirs not in made:
            torch.manual_seed(0)
            ref = calibrated(timm.create_model(theirs))
            sd, paths = ref.state_dict(), {}
            for kind, obj in (('plain', sd), ('state_dict', {'state_dict': sd}), ('model', {'model': sd})):
                paths[kind] = root / f'{theirs}_{kind}.pth'
                torch.save(obj, paths[kind])
            made[theirs] = (ref, paths)
        return made[theirs]
    return get


def max_error(got: torch.Tensor, expected: torch.Tensor, layout_nchw: bool) -> float:
    """NCHW: computed exactly as timm does, so absolute. Default NHWC: other conv kernels, so the
    error is taken relative to the logit scale (random weights give logits in the hundreds)."""
    err = (got - expected).abs().max().item()
    return err if layout_nchw else err / expected.abs().max().item()


@pytest.mark.parametrize('ours,theirs', [pytest.param('hrnet_w18_c', 'hrnet_w18', marks=SLOW),
                                         ('hrnet_w18_small_v2_c', 'hrnet_w18_small_v2')])
@pytest.mark.parametrize('kind', ['plain', 'state_dict', 'model'])
@pytest.mark.parametrize('nchw', [True, False], ids=['nchw', 'default_nhwc'])
def test_timm_weights_load_with_identical_logits(timm_checkpoints, ours, theirs, kind, nchw):
    ref, paths = timm_checkpoints(theirs)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    layout = dict(channels_last=False) if nchw else {}
    with torch.no_grad():
        expected = ref(x)
        via_ckpt = timm.create_model(ours, checkpoint_path=str(paths[kind]), **layout).eval()
        via_pretrained = timm.create_model(
            ours, pretrained=True, pretrained_cfg_overlay=dict(file=str(paths[kind])), **layout).eval()
        for model in (via_ckpt, via_pretrained):
            if nchw:  # timm's layout: the same kernels, bit-identical logits (the README's claim)
                assert torch.equal(model(x), expected)
            else:
                assert max_error(model(x), expected, nchw) < 1e-5


def test_timm_weights_fine_tune_into_new_num_classes(timm_checkpoints):
    """As for every timm model: checkpoint_path is a strict load, pretrained weights adapt the head."""
    ref, paths = timm_checkpoints('hrnet_w18_small_v2')
    with pytest.raises(RuntimeError, match='size mismatch for classifier.weight'):
        timm.create_model('hrnet_w18_small_v2_c', num_classes=7, checkpoint_path=str(paths['state_dict']))
    explicit = timm.create_model('hrnet_w18_small_v2_c', num_classes=7)
    assert init_from(explicit, paths['state_dict']) == ['classifier.weight', 'classifier.bias']
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = ref.forward_head(ref.forward_features(x), pre_logits=True)
        for model in (
            explicit,
            timm.create_model('hrnet_w18_small_v2_c', num_classes=7, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(paths['plain']))),
        ):
            model.eval()
            assert model(x).shape == (1, 7)
            got = model.forward_head(model.forward_features(x), pre_logits=True)
            assert max_error(got, expected, layout_nchw=False) < 1e-5


def test_missing_weights_file_is_named(tmp_path):
    missing = tmp_path / 'nope.pth'
    with pytest.raises(RuntimeError, match='nope.pth'):
        timm.create_model(TINY, pretrained=True, pretrained_cfg_overlay=dict(file=str(missing)))


@pytest.mark.slow  # 18 models built on the meta device: ~10 s on 2 cores
def test_every_timm_twin_has_timms_state_dict_layout():
    """The exports of hrnet_c.TIMM_TWINS name timm's architecture: its keys, in order, and shapes must be ours."""
    for ours, theirs in TIMM_TWINS.items():
        with torch.device('meta'):
            a, b = timm.create_model(ours).state_dict(), timm.create_model(theirs).state_dict()
        assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in a), (ours, theirs)

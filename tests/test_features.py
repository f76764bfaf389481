"""Tracing, export and feature extraction: torch.fx, feature_cls='fx', torch.export with a dynamic
batch, feature_location ('incre' / ''), the HRNetV2 representation, all against eager and timm's HRNet.

Inputs are 64x64 (a multiple of 32, so every stream divides exactly) unless a test is about odd sizes.
Only hrnet_tiny_c runs in the fast lane; the full-size variants are marked slow.
"""
import copy

import pytest
import timm
import torch
import torchvision.models.feature_extraction as tv_fx
from timm.models import FeatureGraphNet, create_feature_extractor, get_graph_node_names
from timm.models._features import FeatureGetterNet

import hrnet_cls
from hrnet_cls.models.blocks import DropPath, _upsample_add
from hrnet_cls.models.features import hrnetv2_features

# One torch thread (conftest): on the shared 2-core machine two threads spin-wait on each other.
pytestmark = pytest.mark.usefixtures('one_thread')

TINY = 'hrnet_tiny_c'
SLOW = pytest.mark.slow
ALL = sorted(timm.list_models('hrnet*_c*'))  # 'hrnet*_c' would miss hrnet_w44_c_basic
VARIANTS = [n if n == TINY else pytest.param(n, marks=SLOW) for n in ALL]
STREAMS = [f'streams.{i}' for i in range(4)]
INCRE = [f'incre_modules.{i}' for i in range(4)]


def build(name: str, **kwargs) -> torch.nn.Module:
    """The same random weights for the same name and kwargs (BN at its initial statistics), in eval mode."""
    torch.manual_seed(0)
    return timm.create_model(name, **kwargs).eval()


@pytest.fixture(scope='module', params=VARIANTS)
def variant(request):
    """(name, model) for the tracing tests; module scope groups those tests by variant, so each model
    is built once and released before the next."""
    return request.param, build(request.param)


def images(batch: int = 2, size: int = 64) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch * 1000 + size))


def rel_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max()).item()


def test_registry_lists_all_variants():
    assert len(ALL) == 13 and set(ALL) == set(hrnet_cls.VARIANTS)


# --- Task 1: torch.fx ---

def test_symbolic_trace_equals_eager_forward_and_backward(variant):
    """Plain torch.fx.symbolic_trace: the fuse's upsample-add stays one leaf node (it branches on shapes),
    so the graph equals eager exactly, at odd sizes too, and its gradients are eager's."""
    _, model = variant
    model.eval()
    gm = torch.fx.symbolic_trace(model)
    assert any(n.op == 'call_function' and n.target is _upsample_add for n in gm.graph.nodes)
    with torch.no_grad():
        for x in (images(), images(1, 50)):  # 50: not a multiple of 32, F.interpolate fallback
            assert torch.equal(gm(x), model(x))

    model.train()  # batch statistics; the traced graph shares the model's modules and parameters
    x = images()
    weight = torch.randn(model.num_classes, generator=torch.Generator().manual_seed(3))
    grads = []
    for fn in (model, gm):
        model.zero_grad(set_to_none=True)
        out = fn(x)
        (out * weight).sum().backward()
        grads.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (eager_out, eager), (fx_out, fx) = grads
    assert torch.equal(fx_out, eager_out)
    assert eager['conv1.weight'].abs().sum() > 0
    for n in eager:
        assert torch.equal(fx[n], eager[n]), n
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize('name', VARIANTS)
@pytest.mark.parametrize('location', ['incre', ''])
def test_features_only_fx_equals_getter(name, location):
    """feature_cls='fx' (timm's FeatureGraphNet on the feature_info module names) equals the default getter."""
    getter = build(name, features_only=True, feature_location=location)
    graph = build(name, features_only=True, feature_location=location, feature_cls='fx')
    assert isinstance(getter, FeatureGetterNet) and isinstance(graph, FeatureGraphNet)
    assert graph.feature_info.channels() == getter.feature_info.channels()
    assert graph.feature_info.reduction() == getter.feature_info.reduction() == [2, 4, 8, 16, 32]
    assert graph.feature_info.module_name() == ['act1'] + (INCRE if location == 'incre' else STREAMS)
    with torch.no_grad():
        x = images()
        ref, out = getter(x), graph(x)
    assert [t.shape[1] for t in ref] == getter.feature_info.channels()
    assert len(out) == len(ref) == 5
    for a, b in zip(out, ref):
        assert torch.equal(a, b)
    kept = {n.split('.')[0] for n, _ in graph.graph_module.named_children()}
    assert 'classifier' not in kept and 'final_layer' not in kept  # the graph ends at the last tap
    if name == TINY:  # forward hooks on the same module names work as well
        with torch.no_grad():
            hooks = build(name, features_only=True, feature_location=location, feature_cls='hook')(x)
        assert all(torch.equal(a, b) for a, b in zip(hooks, ref))


def test_fx_feature_extraction_on_stream_and_incre_nodes(variant):
    """timm's FX extractor (torchvision's, with timm's leaf registry) and, for the tiny model, torchvision's
    own return the stem, the raw streams, the incre outputs and the final features as eager computes them."""
    name, model = variant
    model.eval()
    nodes = ['act1', *STREAMS, *INCRE, 'final_layer']
    extractors = [create_feature_extractor(model, nodes)]
    if name == TINY:  # the same without timm's leaf registry; and the node names timm's tracer lists
        extractors.append(tv_fx.create_feature_extractor(model, nodes))
        for listed in get_graph_node_names(model):  # (train, eval); a module's nodes start with its name
            assert all(any(n == node or n.startswith(node + '.') for n in listed) for node in nodes)
    x = images()
    with torch.no_grad():
        final, incre = model.forward_intermediates(x)
        expected = [incre[0], *model.forward_streams(model.forward_stem(x)), *incre[1:], final]
        for extractor in extractors:
            got = extractor(x)
            assert list(got) == nodes
            for node, a, b in zip(nodes, got.values(), expected):
                assert torch.equal(a, b), node


def test_fx_keeps_drop_path_and_grad_checkpointing_behaviour():
    """DropPath is a leaf for timm's tracer, so the extracted graph drops paths in training exactly as
    eager does (same RNG draws, same 1/keep_prob scale) and not in eval. With grad checkpointing on,
    tracing records the plain computation: checkpointing is an eager-mode memory saving."""
    model = build(TINY, drop_path_rate=0.3)
    fx = create_feature_extractor(model, ['final_layer'])
    assert any(isinstance(m, DropPath) for m in fx.modules())
    x = images()
    with torch.no_grad():
        assert torch.equal(fx(x)['final_layer'], model.forward_features(x))
        model.train()
        fx.train()
        draws = []
        for fn in (lambda t: model.forward_features(t), lambda t: fx(t)['final_layer']):
            torch.manual_seed(5)
            draws.append(fn(x))
        torch.manual_seed(6)
        assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], fx(x)['final_layer'])
    model = build(TINY)
    model.set_grad_checkpointing(True)
    with torch.no_grad():
        assert torch.equal(torch.fx.symbolic_trace(model)(x), model(x))


# --- Task 1: torch.export with a dynamic batch ---

@pytest.mark.parametrize('name', [TINY, pytest.param('hrnet_w18_c', marks=SLOW)])
def test_export_with_dynamic_batch_equals_eager(name):
    model = build(name)
    batch = torch.export.Dim('batch')
    exported = torch.export.export(model, (images(2),), dynamic_shapes={'x': {0: batch}}).module()
    with torch.no_grad():
        for b in (1, 3):
            x = images(b)
            assert torch.equal(exported(x), model(x)), b


# --- Task 2: feature_location ---

def test_feature_location_contract():
    incre, raw = build(TINY), build(TINY, feature_location='')
    assert incre.feature_location == 'incre' and raw.feature_location == ''
    assert [f['num_chs'] for f in incre.feature_info] == [16, 32, 64, 128, 256]
    assert [f['num_chs'] for f in raw.feature_info] == [16, 4, 8, 16, 32]
    assert [f['reduction'] for f in raw.feature_info] == [2, 4, 8, 16, 32]
    assert raw.state_dict().keys() == incre.state_dict().keys()  # the same module tree and weights
    x = images()
    with torch.no_grad():
        final, feats = raw.forward_intermediates(x)
        assert torch.equal(final, raw.forward_features(x))
        streams = raw.forward_streams(raw.forward_stem(x))
        for a, b in zip(feats[1:], streams):
            assert torch.equal(a, b)
        assert [t.shape[1] for t in raw.forward_intermediates(x, indices=[0, 2], intermediates_only=True)] == [16, 8]
    pruned = copy.deepcopy(raw)
    assert pruned.prune_intermediate_layers([1, 4]) == [1, 4]
    assert len(pruned.incre_modules) == 0 and pruned.final_layer is None and pruned.num_classes == 0
    with torch.no_grad():
        only = pruned.forward_intermediates(x, indices=[1, 4], intermediates_only=True)
        assert torch.equal(only[0], streams[0]) and torch.equal(only[1], streams[3])
    with pytest.raises(ValueError, match='whole head'):
        pruned.forward_intermediates(x)
    feats = timm.create_model(TINY, features_only=True, feature_location='', out_indices=(0, 2, 4))
    assert feats.feature_info.channels() == [16, 8, 32] and feats.feature_info.reduction() == [2, 8, 32]
    assert not [k for k in feats.state_dict() if 'incre' in k or 'final_layer' in k or 'classifier' in k]
    for bad in ('stage', 'INCRE', 'streams'):
        with pytest.raises(ValueError, match='feature_location'):
            timm.create_model(TINY, feature_location=bad)


@pytest.fixture(scope='module')
def timm_weights(tmp_path_factory):
    """timm_weights(name): the path of a randomly initialised, BN-calibrated timm model's state dict."""
    made, root = {}, tmp_path_factory.mktemp('timm_weights')

    def get(theirs: str):
        if theirs not in made:
            torch.manual_seed(0)
            ref = timm.create_model(theirs).train()
            with torch.no_grad():
                for _ in range(2):
                    ref(torch.randn(4, 3, 64, 64))
            made[theirs] = root / f'{theirs}.pth'
            torch.save(ref.state_dict(), made[theirs])
        return made[theirs]
    return get


@pytest.mark.parametrize('ours,theirs', [pytest.param('hrnet_w18_c', 'hrnet_w18', marks=SLOW),
                                         ('hrnet_w18_small_v2_c', 'hrnet_w18_small_v2')])
@pytest.mark.parametrize('location', ['', 'incre'])
def test_feature_location_matches_timm_hrnet(timm_weights, ours, theirs, location):
    """The same weights, features_only=True with the same feature_location: timm's HRNet features."""
    kwargs = dict(features_only=True, feature_location=location, pretrained=True,
                  pretrained_cfg_overlay=dict(file=str(timm_weights(theirs))))
    ref = timm.create_model(theirs, **kwargs).eval()
    x = images()
    with torch.no_grad():
        expected = ref(x)
        for layout in (dict(channels_last=False), {}):
            model = timm.create_model(ours, **kwargs, **layout).eval()
            assert model.feature_info.channels() == ref.feature_info.channels()
            assert model.feature_info.reduction() == ref.feature_info.reduction()
            got = model(x)
            assert len(got) == len(expected) == 5
            for a, b in zip(got, expected):
                assert a.shape == b.shape
                if layout:  # channels_last=False: timm's arithmetic exactly
                    assert torch.equal(a, b)
                else:  # the default NHWC: other conv kernels, so relative to the feature scale
                    assert rel_error(a, b) < 1e-5


# --- Task 2: the HRNetV2 representation ---

@pytest.mark.parametrize('name,width', [(TINY, 4), pytest.param('hrnet_w18_c', 18, marks=SLOW)])
def test_hrnetv2_features(name, width):
    model = build(name)
    x = images()
    with torch.no_grad():
        streams = model.forward_streams(model.forward_stem(x))
        rep = hrnetv2_features(model, x)
        assert rep.shape == (2, 15 * width, 16, 16)
        assert torch.equal(rep[:, :width], streams[0])
        up = torch.nn.functional.interpolate(streams[3], size=(16, 16), mode='bilinear', align_corners=False)
        assert torch.equal(rep[:, 7 * width:], up)  # the lowest stream is upsampled 8x, last
        for cls in ('getter', 'fx'):  # a features_only model with the raw streams gives the same
            feats = build(name, features_only=True, feature_location='', feature_cls=cls)
            assert torch.equal(hrnetv2_features(feats, x), rep)
        assert hrnetv2_features(model, images(1, 50)).shape == (1, 15 * width, 13, 13)
    with pytest.raises(ValueError, match="feature_location=''"):
        hrnetv2_features(build(name, features_only=True), x)

"""HRNet-C (Wang et al., TPAMI 2020, arXiv 1908.07919, Appendix B): the variant table, the network, its entry points.

Architecture and variants: docs/design.md §1-2; what differs from timm's ``hrnet.py``: §1.7."""
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import create_classifier
from timm.models import build_model_with_cfg, generate_default_cfgs, is_model, model_entrypoint, register_model

from .blocks import BLOCKS, BN_MOMENTUM, Bottleneck, Checkpointable, CheckpointSeq, HRModule, HRStage, Transition
from .blocks import conv_bn, units
from .features import check_feature_location, feature_info, take_indices

__all__ = ['HighResolutionNetC', 'HRNetCfg', 'Variant', 'VARIANTS', 'MODEL_CFGS', 'PAPER_TOP1', 'STEM_STRIDE']

STEM_STRIDE = 4  # two stride-2 convs before the first stream


@dataclass(frozen=True)
class HRNetCfg:
    """One variant. Widths are the residual units' inner widths (NUM_CHANNELS)."""
    block: str  # 'basic' or 'bottleneck' in stages 2-4
    widths: Tuple[int, int, int, int]
    num_modules: Tuple[int, int, int] = (1, 4, 3)  # HR modules in stages 2, 3, 4
    num_units: int = 4  # residual units per stream per module
    stem_width: int = 64
    stage1_width: int = 64  # bottleneck inner width of stage 1 (expansion 4)
    stage1_units: int = 4
    head_widths: Tuple[int, int, int, int] = (32, 64, 128, 256)  # incre bottleneck inner widths
    num_features: int = 2048  # width of the final 1x1 conv


def _small(widths: Tuple[int, ...], stage1_width: int, stage1_units: int, num_modules: Tuple[int, ...]) -> HRNetCfg:
    return HRNetCfg('basic', widths, num_modules, 2, stage1_width=stage1_width, stage1_units=stage1_units)


@dataclass(frozen=True)
class Variant:
    """One registered model: its architecture and the numbers it is checked against."""
    cfg: HRNetCfg
    params: int  # exact parameter count at 1000 classes
    gflops: float  # conv + linear multiply-adds per 224x224 image / 2^30, as the paper reports "GFLOPs"
    top1: Optional[float] = None  # ImageNet-1k val top-1 (%) published for it
    source: str = ''  # where top1 comes from: 'paper' (Table XV) or 'repo' (the authors' repository)


# The one variant table (docs/design.md §2.7): the recipes, the README's table and the tests derive from it.
VARIANTS: Dict[str, Variant] = {
    'hrnet_w18_c': Variant(HRNetCfg('basic', (18, 36, 72, 144)), 21_299_004, 3.99, 76.9, 'paper'),
    'hrnet_w30_c': Variant(HRNetCfg('basic', (30, 60, 120, 240)), 37_712_220, 7.55, 78.1, 'paper'),
    'hrnet_w32_c': Variant(HRNetCfg('basic', (32, 64, 128, 256)), 41_232_680, 8.31, 78.5, 'repo'),
    'hrnet_w40_c': Variant(HRNetCfg('basic', (40, 80, 160, 320)), 57_557_160, 11.82, 78.9, 'paper'),
    'hrnet_w48_c': Variant(HRNetCfg('basic', (48, 96, 192, 384)), 77_469_864, 16.09, 79.3, 'repo'),
    'hrnet_w64_c': Variant(HRNetCfg('basic', (64, 128, 256, 512)), 128_059_944, 26.91, 79.5, 'repo'),
    'hrnet_w44_c': Variant(HRNetCfg('bottleneck', (11, 22, 44, 88)), 21_931_192, 3.90, 77.0, 'paper'),
    'hrnet_w76_c': Variant(HRNetCfg('bottleneck', (19, 38, 76, 152)), 40_783_032, 7.30, 78.5, 'paper'),
    'hrnet_w96_c': Variant(HRNetCfg('bottleneck', (24, 48, 96, 192)), 57_481_512, 10.25, 79.0, 'paper'),
    'hrnet_w44_c_basic': Variant(HRNetCfg('basic', (44, 88, 176, 352)), 67_064_984, 13.86, 78.9, 'repo'),
    'hrnet_w18_small_c': Variant(_small((16, 32, 64, 128), 32, 1, (1, 1, 1)), 13_187_464, 1.49, 72.3, 'repo'),
    'hrnet_w18_small_v2_c': Variant(_small((18, 36, 72, 144), 64, 2, (1, 3, 2)), 15_597_464, 2.42, 75.1, 'repo'),
    'hrnet_tiny_c': Variant(HRNetCfg(
        'basic', (4, 8, 16, 32), (1, 1, 1), 1, stem_width=16, stage1_width=8, stage1_units=1,
        head_widths=(8, 16, 32, 64), num_features=256), 860_032, 0.0866),
}
MODEL_CFGS: Dict[str, HRNetCfg] = {name: v.cfg for name, v in VARIANTS.items()}
# In eval, timm's own model of the same name without "_c" (same graph and keys): plain timm loads their exports.
TIMM_TWINS: Dict[str, str] = {
    'hrnet_w18_c': 'hrnet_w18', 'hrnet_w30_c': 'hrnet_w30', 'hrnet_w32_c': 'hrnet_w32', 'hrnet_w40_c': 'hrnet_w40',
    'hrnet_w48_c': 'hrnet_w48', 'hrnet_w64_c': 'hrnet_w64', 'hrnet_w44_c_basic': 'hrnet_w44',
    'hrnet_w18_small_c': 'hrnet_w18_small', 'hrnet_w18_small_v2_c': 'hrnet_w18_small_v2',
}
PAPER_TOP1: Dict[str, float] = {name: v.top1 for name, v in VARIANTS.items() if v.top1 is not None}


class HighResolutionNetC(nn.Module):
    """HRNet with four streams at 1/4..1/32 and the cascaded bottleneck ("C") head."""

    def __init__(
            self,
            cfg: HRNetCfg,
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            channels_last: bool = True,
            feature_location: str = 'incre',
    ):
        super().__init__()
        _check_args(num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate, drop_path_rate=drop_path_rate)
        self.feature_location = check_feature_location(feature_location)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        # NHWC activations and conv weights whatever the input layout (docs/design.md §1.7)
        self.channels_last = channels_last
        self.grad_checkpointing = False
        depth = cfg.stage1_units + sum(cfg.num_modules) * cfg.num_units
        dpr = [drop_path_rate * d / max(depth - 1, 1) for d in range(depth)]  # linear in depth

        self.conv1 = nn.Conv2d(in_chans, cfg.stem_width, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cfg.stem_width, momentum=BN_MOMENTUM)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cfg.stem_width, cfg.stem_width, 3, 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cfg.stem_width, momentum=BN_MOMENTUM)
        self.act2 = nn.ReLU(inplace=True)
        self.layer1 = CheckpointSeq(*units(Bottleneck, cfg.stem_width, cfg.stage1_width, cfg.stage1_units, dpr))
        chs = self._add_stages(cfg, BLOCKS[cfg.block], dpr[cfg.stage1_units:])
        self.streams = nn.ModuleList([nn.Identity() for _ in chs])  # taps naming the raw streams (no state)

        head = [w * Bottleneck.expansion for w in cfg.head_widths]
        self.incre_modules = nn.ModuleList(
            [CheckpointSeq(*units(Bottleneck, chs[i], cfg.head_widths[i], 1, [0.0])) for i in range(4)])
        self.downsamp_modules = nn.ModuleList([conv_bn(head[i], head[i + 1], 3, 2, bias=True) for i in range(3)])
        self.final_layer = conv_bn(head[3], cfg.num_features, 1, bias=True)
        self.num_features = self.head_hidden_size = cfg.num_features
        self.global_pool, self.head_drop, self.classifier = create_classifier(
            self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate)

        self.feature_info = feature_info(cfg.stem_width, chs, head, feature_location, STEM_STRIDE)
        self._init_weights()
        if channels_last:
            self.to(memory_format=torch.channels_last)  # 4-D conv weights only; state-dict values unchanged

    def _add_stages(self, cfg: HRNetCfg, block: type, dpr: List[float]) -> List[int]:
        """transition1..3 and stage2..4 (``dpr``: their units' drop-path rates); returns the streams' widths."""
        chs, d = [cfg.stage1_width * Bottleneck.expansion], 0
        for s, n_modules in enumerate(cfg.num_modules):
            widths = list(cfg.widths[:s + 2])
            new_chs = [w * block.expansion for w in widths]
            setattr(self, f'transition{s + 1}', Transition(chs, new_chs))
            modules = []
            for _ in range(n_modules):
                modules.append(HRModule(block, new_chs, widths, cfg.num_units, dpr[d:d + cfg.num_units]))
                d += cfg.num_units
            setattr(self, f'stage{s + 2}', HRStage(*modules))
            chs = new_chs
        return chs

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^conv[12]|bn[12]',
            blocks=r'^(?:layer|stage|transition)(\d+)' if coarse else [
                (r'^layer1\.(\d+)', None),
                (r'^stage(\d+)\.(\d+)', None),
                (r'^transition(\d+)', (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each stage-1 unit, HR module and incre block in backward (exact: blocks.checkpoint_module)."""
        self.grad_checkpointing = enable
        for m in self.modules():
            if isinstance(m, Checkpointable):
                m.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        _check_args(num_classes=num_classes)
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        self.global_pool, self.head_drop, self.classifier = create_classifier(
            self.num_features, num_classes, pool_type=global_pool, drop_rate=self.drop_rate)

    def _to_layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(self._to_layout(x))))  # (B, stem, H/2, W/2)
        return self.act2(self.bn2(self.conv2(x)))  # (B, stem, H/4, W/4)

    def forward_streams(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Stem output -> the four streams (B, C * 2^i, H / 2^(i+2), W / 2^(i+2))."""
        xl = self.transition1([self.layer1(x)])
        xl = self.transition2(self.stage2(xl))
        xl = self.stage4(self.transition3(self.stage3(xl)))
        out: List[torch.Tensor] = []
        for i, tap in enumerate(self.streams):
            out.append(tap(xl[i]))
        return out

    def forward_head_features(self, xl: List[torch.Tensor]) -> torch.Tensor:
        """Cascade: y = incre0(x0); y = incre_i(x_i) + down_i(y); then the 1x1 conv to num_features."""
        feats: List[torch.Tensor] = []  # (B, 128 * 2^i, H / 2^(i+2), W / 2^(i+2)) for the full head
        for i, incre in enumerate(self.incre_modules):
            feats.append(incre(xl[i]))
        y = feats[0]
        for i, down in enumerate(self.downsamp_modules):
            y = feats[i + 1] + down(y)
        return self.final_layer(y)  # (B, num_features, H/32, W/32)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head_features(self.forward_streams(self.forward_stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.global_pool(x))
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Index 0: the stem (stride 2); 1-4: the incre outputs ('incre') or the raw streams ('').
        Returns the intermediates, or (forward_features output, intermediates)."""
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt={output_fmt!r} unsupported: HRNet-C features are 'NCHW'")
        take, max_index = take_indices(len(self.feature_info), indices)
        stop_early = stop_early or intermediates_only
        feats: List[torch.Tensor] = []
        x = self.act1(self.bn1(self.conv1(self._to_layout(x))))
        if 0 in take:
            feats.append(x)
        if stop_early and max_index == 0:
            return feats if intermediates_only else (x, feats)
        xl = self.forward_streams(self.act2(self.bn2(self.conv2(x))))
        raw = self.feature_location == ''
        if raw:  # the streams are the features; the head runs only for the final output
            feats.extend([xl[i] for i in range(len(xl)) if i + 1 in take])
            n_incre = 0 if intermediates_only else len(self.incre_modules)
        else:
            n_incre = max_index if stop_early else len(self.incre_modules)
        y = None
        for i in range(n_incre):
            t = self.incre_modules[i](xl[i])
            if i + 1 in take and not raw:
                feats.append(t)
            if not intermediates_only:
                y = t if y is None else t + self.downsamp_modules[i - 1](y)
        if intermediates_only:
            return feats
        if n_incre < len(self.streams) or self.final_layer is None:
            raise ValueError('the final features need the whole head: call with stop_early=False on an unpruned model')
        return self.final_layer(y), feats

    @torch.jit.ignore
    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop what the selected intermediates do not need: the incre blocks after the last one taken
        (all of them for feature_location=''), and with prune_head the cascade and the classifier."""
        take, max_index = take_indices(len(self.feature_info), indices)
        keep = max_index if self.feature_location == 'incre' else 0 if prune_head else len(self.incre_modules)
        self.incre_modules = self.incre_modules[:keep]
        if prune_head:
            self.downsamp_modules = nn.ModuleList()
            self.final_layer = None
            self.reset_classifier(0, '')
        return take


def _check_args(**values: float) -> None:
    limits = dict(num_classes=(0, None), in_chans=(1, None), drop_rate=(0.0, 1.0), drop_path_rate=(0.0, 1.0))
    for name, value in values.items():
        lo, hi = limits[name]
        if value < lo or (hi is not None and value >= hi):
            bound = f'>= {lo}' if hi is None else f'in [{lo}, {hi})'
            raise ValueError(f'{name}={value} is invalid: must be {bound}')


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> HighResolutionNetC:
    try:
        return build_model_with_cfg(
            HighResolutionNetC, variant, pretrained,
            model_cfg=MODEL_CFGS[variant],
            feature_cfg=dict(feature_cls='getter', out_indices=(0, 1, 2, 3, 4)),
            **kwargs,
        )
    except OSError as e:  # hub unreachable, or a missing weights file (timm's error has no text)
        if not pretrained:
            raise
        source = (kwargs.get('pretrained_cfg_overlay') or {}).get('file') or 'the Hugging Face hub'
        raise RuntimeError(
            f'{variant}: pretrained weights could not be loaded from {source} ({type(e).__name__}: {e}). '
            f"Offline, pass pretrained_cfg_overlay=dict(file='weights.pth') or checkpoint_path=...") from e


def _cfg(hub: str = '', **kwargs: Any) -> Dict[str, Any]:
    cfg = dict(
        num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875, interpolation='bilinear',
        mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, first_conv='conv1', classifier='classifier',
        license='mit', paper_ids='arXiv:1908.07919',
    )
    if hub:
        cfg['hf_hub_id'] = f'timm/{hub}'
    return {**cfg, **kwargs}


default_cfgs = generate_default_cfgs({
    'hrnet_w18_c.ms_in1k': _cfg('hrnet_w18.ms_in1k'),
    'hrnet_w18_c.ms_aug_in1k': _cfg('hrnet_w18.ms_aug_in1k', crop_pct=0.95),
    'hrnet_w30_c.ms_in1k': _cfg('hrnet_w30.ms_in1k'),
    'hrnet_w32_c.ms_in1k': _cfg('hrnet_w32.ms_in1k'),
    'hrnet_w40_c.ms_in1k': _cfg('hrnet_w40.ms_in1k'),
    'hrnet_w48_c.ms_in1k': _cfg('hrnet_w48.ms_in1k'),
    'hrnet_w64_c.ms_in1k': _cfg('hrnet_w64.ms_in1k'),
    'hrnet_w44_c': _cfg(),  # the paper's bottleneck W44/W76/W96-C: no published weights
    'hrnet_w76_c': _cfg(),
    'hrnet_w96_c': _cfg(),
    'hrnet_w44_c_basic.ms_in1k': _cfg('hrnet_w44.ms_in1k'),
    'hrnet_w18_small_c.ms_in1k': _cfg('hrnet_w18_small.ms_in1k'),
    'hrnet_w18_small_c.gluon_in1k': _cfg('hrnet_w18_small.gluon_in1k', interpolation='bicubic', license='apache-2.0'),
    'hrnet_w18_small_v2_c.ms_in1k': _cfg('hrnet_w18_small_v2.ms_in1k'),
    'hrnet_w18_small_v2_c.gluon_in1k': _cfg(
        'hrnet_w18_small_v2.gluon_in1k', interpolation='bicubic', license='apache-2.0'),
    'hrnet_tiny_c': _cfg(input_size=(3, 32, 32), pool_size=(1, 1), crop_pct=1.0),  # as the demo trains and validates
})


def _register(fn):
    """register_model, refusing to replace a model timm itself (or anyone else) registered."""
    existing = model_entrypoint(fn.__name__) if is_model(fn.__name__) else None
    if existing is not None and existing.__module__ != fn.__module__:
        raise RuntimeError(f'{fn.__name__!r} is already registered by {existing.__module__}; not overwriting it')
    return register_model(fn)


def _entrypoint(variant: str) -> Callable[..., HighResolutionNetC]:
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> HighResolutionNetC:
        return _create(variant, pretrained, **kwargs)
    entrypoint.__name__ = entrypoint.__qualname__ = variant  # the name timm registers it under
    return entrypoint


# One entry point per VARIANTS row, a module attribute (hrnet_c.hrnet_w18_c) as in timm's model files.
for _variant in VARIANTS:
    globals()[_variant] = _register(_entrypoint(_variant))

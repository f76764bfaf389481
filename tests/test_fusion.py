"""BatchNorm folding for inference: a copy with no BatchNorm left, the same outputs, the original untouched."""
from __future__ import annotations

import pytest
import timm
import torch

from conftest import tiny_model
from hrnet_cls.models.inference import fold_batchnorm


def calibrated(model: torch.nn.Module, size: int = 64) -> torch.nn.Module:
    """Realistic BN running statistics (a few train-mode batches)."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, size, size))
    return model


@pytest.mark.parametrize("name", ["hrnet_tiny_c", "hrnet_w18_small_v2_c", "hrnet_w18_small_v2"])
def test_folded_model_has_no_batchnorm_and_the_same_logits(name: str) -> None:
    torch.manual_seed(0)
    model = calibrated(timm.create_model(name, num_classes=10))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batchnorm(model, check=torch.randn(2, 3, 64, 64))
    assert not [m for m in folded.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert folded.folded_batchnorms == sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched
    x = torch.randn(8, 3, 96, 96)
    with torch.no_grad():
        expected, got = model.eval()(x), folded(x)
    assert (got - expected).abs().max() / expected.abs().max() < 1e-5
    assert torch.equal(got.topk(5).indices, expected.topk(5).indices)


def test_a_wrong_pairing_is_caught_by_the_check() -> None:
    class Unchained(torch.nn.Module):  # named like a pair, but the BN does not follow the conv
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.bn1 = torch.nn.Conv2d(3, 3, 1), torch.nn.BatchNorm2d(3)

        def forward(self, x):
            return self.conv1(x) + self.bn1(x)

    model = Unchained()
    model.bn1.running_var.fill_(4.0)  # BN(x) = x / 2: not the same as halving the conv's output
    with pytest.raises(ValueError, match="folding BatchNorm changed the outputs"):
        fold_batchnorm(model, check=torch.randn(2, 3, 4, 4))
    assert isinstance(tiny_model().bn1, torch.nn.BatchNorm2d)

"""Units on every common layout: the unit dimension comes from the layer that produced the activation's input.
Expected dead ratios come from planted dead channels."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from hookscope import DeadReLU, HookManager
from hookscope.sites import infer_unit_dim


def plant_dead(linear_or_conv: nn.Module, channels: list[int]) -> None:
    """Make the given output channels of a Linear/Conv hugely negative: the activation after it never fires."""
    with torch.no_grad():
        linear_or_conv.weight[channels] = 0.0
        linear_or_conv.bias[channels] = -1e4


def report(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[int, float]]:
    with HookManager(model, [DeadReLU()], alerts=False) as hm, torch.no_grad():
        model.eval()
        model(x)
        hm.step()
    return {r.layer: (r.units, r.dead_ratio) for r in hm.to_dataframe().itertuples()}


def test_convnext_channels_last_gelu_has_its_channels_as_units() -> None:
    model = torchvision.models.convnext_tiny(weights=None)
    block = model.features[1][0].block  # Conv2d, Permute, LayerNorm, Linear(96, 384), GELU, Linear, Permute
    plant_dead(block[3], list(range(0, 384, 2)))  # half of the 384 GELU channels
    got = report(model, torch.randn(2, 3, 32, 32))
    assert got["features.1.0.block.4"] == (384, 0.5)  # units 8 (H), dead 0% before
    assert all(units == 384 for layer, (units, _) in got.items() if layer.startswith("features.1."))


def test_swin_mlp_gelu_has_its_channels_as_units() -> None:
    model = torchvision.models.swin_t(weights=None)
    mlp = model.features[1][0].mlp  # Linear(96, 384), GELU, Dropout, Linear, Dropout on (N, H, W, C)
    plant_dead(mlp[0], [0, 1, 2, 3, *range(100, 192)])  # 96 of 384
    got = report(model, torch.randn(1, 3, 32, 32))
    assert got["features.1.0.mlp.1"] == (384, 96 / 384)


class Whisperish(nn.Module):
    """A Conv1d front-end as in Whisper's encoder: gelu(conv(x)) on (N, C, L), then (B, T, F) features."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(8, 32, 3, padding=1)
        self.fc = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.conv1(x))  # (N, 32, L=64)
        return torch.relu(self.fc(h.transpose(1, 2)))  # (N, 64, 16)


def test_conv1d_front_end_and_sequence_features() -> None:
    model = Whisperish()
    plant_dead(model.conv1, list(range(8)))  # 8 of 32 channels
    plant_dead(model.fc, [0, 5, 9, 15])  # 4 of 16 features
    got = report(model, torch.randn(2, 8, 64))
    assert got["gelu()"] == (32, 8 / 32)  # 64 time steps taken as units before
    assert got["relu()"] == (16, 4 / 16)


def test_nchw_after_batchnorm_and_a_head() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 12, 3), nn.BatchNorm2d(12), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5),
        nn.ReLU(),
    )  # fmt: skip
    plant_dead(model[0], [1, 2, 3])
    with torch.no_grad():  # eval BatchNorm keeps the planted -1e4 negative
        model[1].running_mean.zero_()
        model[1].running_var.fill_(1.0)
    with torch.no_grad():  # the head: units 0-3 always fire (bias 1), unit 4 never
        model[5].weight.zero_()
        model[5].bias.copy_(torch.tensor([1.0, 1.0, 1.0, 1.0, -1e4]))
    got = report(model, torch.randn(4, 3, 8, 8))
    assert got["2"] == (12, 3 / 12) and got["6"] == (5, 1 / 5)


def test_the_rule_and_its_warnings() -> None:
    linear = (64, -1, "Linear(out_features=64)")
    conv = (16, 1, "Conv1d(out_channels=16)")
    assert infer_unit_dim((2, 8, 8, 64), linear) == (3, None)  # channels last
    assert infer_unit_dim((2, 16, 100), conv) == (1, None)  # (N, C, L)
    assert infer_unit_dim((2, 100, 16), conv) == (2, None)  # transposed: the one dim of that size, silently
    dim, note = infer_unit_dim((2, 16, 16, 5), (16, -1, "Linear(out_features=16)"))
    assert dim == 1 and note is not None and "ambiguous" in note
    dim, note = infer_unit_dim((2, 7, 9), linear)
    assert dim == 2 and note is not None and "no dim" in note  # falls back to the shape rule
    assert infer_unit_dim((2, 7, 9), None) == (2, None)


def test_an_ambiguous_layout_warns_once_naming_the_site() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc(x)  # (2, 6, 5, 4) -> (2, 6, 5, 6): the 6 features are last, then moved to dim 1
            return torch.relu(h.permute(0, 3, 1, 2))  # (2, 6, 6, 5): dims 1 and 2 both have size 6

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report(Odd(), torch.randn(2, 6, 5, 4))
    messages = [str(w.message) for w in caught if "relu()" in str(w.message)]
    assert len(messages) == 1 and "[2, 6, 6, 5]" in messages[0] and "ambiguous" in messages[0]


def test_unit_dim_still_overrides() -> None:
    model = Whisperish()
    with HookManager(model, [DeadReLU()], unit_dim={"gelu()": 2}, alerts=False) as hm:
        model(torch.randn(2, 8, 64))
    assert hm.site("gelu()").units == 64


@pytest.mark.parametrize("n", [1, 2])
def test_sites_found_after_discovery_fall_back_to_the_rule(n: int) -> None:
    class Late(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(2, 4, 1)
            self.act = nn.ReLU()
            self.late = nn.GELU()

        def forward(self, x: torch.Tensor, late: bool = False) -> torch.Tensor:
            h = self.act(self.conv(x))
            return self.late(self.conv(x)) if late else h

    model = Late()
    with HookManager(model, alerts=False) as hm:
        model(torch.randn(2, 2, 6))
        hm.step()
        for _ in range(n):
            model(torch.randn(2, 2, 6), late=True)
            hm.step()
    assert hm.site("act").units == 4  # discovered with the conv hooked
    # the conv's hooks were slimmed away before `late` first ran: nothing tells, the (B, T, F) rule applies
    assert hm.site("late").units == 6

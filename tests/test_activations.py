"""The activation registry: matching modules by class and by class name, functions, custom kinds."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hookscope as hs
from hookscope.activations import (
    activation_for_function,
    activation_for_module,
    get_activation,
    register_activation,
    unregister_activation,
)
from hookscope.numerics import round_to_dtype, strict_threshold

MODULE_KINDS = [
    (nn.ReLU(), "relu"),
    (nn.ReLU(inplace=True), "relu"),
    (nn.ReLU6(), "relu6"),
    (nn.LeakyReLU(), "leaky_relu"),
    (nn.PReLU(), "prelu"),
    (nn.RReLU(), "rrelu"),
    (nn.ELU(), "elu"),
    (nn.SELU(), "selu"),
    (nn.CELU(), "celu"),
    (nn.GELU(), "gelu"),
    (nn.GELU(approximate="tanh"), "gelu"),
    (nn.SiLU(), "silu"),
    (nn.Mish(), "mish"),
    (nn.Hardswish(), "hardswish"),
    (nn.Hardsigmoid(), "hardsigmoid"),
    (nn.Hardtanh(), "hardtanh"),
    (nn.Sigmoid(), "sigmoid"),
    (nn.Tanh(), "tanh"),
    (nn.Softplus(), "softplus"),
    (nn.Softsign(), "softsign"),
    (nn.Softmax(dim=1), "softmax"),
    (nn.LogSoftmax(dim=1), "log_softmax"),
]


@pytest.mark.parametrize(("module", "kind"), MODULE_KINDS, ids=[k for _, k in MODULE_KINDS])
def test_every_torch_activation_module_has_its_kind(module: nn.Module, kind: str) -> None:
    assert activation_for_module(module).name == kind


def test_non_activation_modules_do_not_match() -> None:
    for m in (nn.Linear(2, 2), nn.Conv2d(1, 1, 1), nn.BatchNorm1d(2), nn.Sequential(), nn.Dropout()):
        assert activation_for_module(m) is None


def test_relu6_is_not_reported_as_its_base_class_hardtanh() -> None:
    assert isinstance(nn.ReLU6(), nn.Hardtanh)
    spec = activation_for_module(nn.ReLU6())
    assert spec.name == "relu6"
    assert spec.resolve_bounds(nn.ReLU6()) == (0.0, 6.0)
    assert spec.saturate == "upper"


@pytest.mark.parametrize(
    ("class_name", "kind"),
    [
        ("GELUActivation", "gelu"),
        ("NewGELUActivation", "gelu"),
        ("QuickGELUActivation", "gelu"),
        ("SiLUActivation", "silu"),
        ("Swish", "silu"),
        ("GELU", "gelu"),
        ("MishActivation", "mish"),
    ],
)
def test_third_party_classes_match_by_class_name(class_name: str, kind: str) -> None:
    cls = type(class_name, (nn.Module,), {"forward": lambda self, x: x})
    assert activation_for_module(cls()).name == kind
    # ... and so do their subclasses
    sub = type("MyVariant", (cls,), {})
    assert activation_for_module(sub()).name == kind


@pytest.mark.parametrize(
    ("func", "kind"),
    [
        (F.relu, "relu"),
        (torch.relu, "relu"),
        (torch.relu_, "relu"),
        (torch.Tensor.relu, "relu"),
        (torch.Tensor.relu_, "relu"),
        (F.gelu, "gelu"),
        (F.silu, "silu"),
        (torch.sigmoid, "sigmoid"),
        (torch.Tensor.sigmoid, "sigmoid"),
        (torch.tanh, "tanh"),
        (F.relu6, "relu6"),
        (F.leaky_relu, "leaky_relu"),
        (F.elu, "elu"),
        (F.hardtanh, "hardtanh"),
        (F.softmax, "softmax"),
        (torch.softmax, "softmax"),
        (F.log_softmax, "log_softmax"),
        (F.mish, "mish"),
        (F.hardswish, "hardswish"),
        (F.softplus, "softplus"),
    ],
)
def test_functional_entry_points(func, kind: str) -> None:
    assert activation_for_function(func).name == kind


def test_hardtanh_bounds_come_from_the_module_or_the_call() -> None:
    spec = get_activation("hardtanh")
    assert spec.resolve_bounds(nn.Hardtanh(-2.0, 3.0)) == (-2.0, 3.0)
    assert spec.resolve_bounds(None, (torch.zeros(1), -0.5, 0.5), {}) == (-0.5, 0.5)
    assert spec.resolve_bounds(None, (torch.zeros(1),), {"max_val": 4.0}) == (-1.0, 4.0)


def test_get_activation_by_name_alias_module_and_class() -> None:
    assert get_activation("ReLU").name == "relu"
    assert get_activation("swish").name == "silu"
    assert get_activation(nn.Tanh).name == "tanh"
    assert get_activation(nn.Tanh()).name == "tanh"


def test_unknown_activation_lists_the_known_ones() -> None:
    with pytest.raises(KeyError) as e:
        get_activation("smu-not-registered")
    msg = str(e.value)
    assert "smu-not-registered" in msg and "relu" in msg and "tanh" in msg
    with pytest.raises(KeyError, match="Linear"):
        get_activation(nn.Linear(1, 1))


class SMU(nn.Module):
    """Smooth Maximum Unit (Biswas et al.), a rectifier that is not a torch class."""

    def __init__(self, alpha: float = 0.01, mu: float = 2.5) -> None:
        super().__init__()
        self.alpha, self.mu = alpha, mu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.alpha
        return ((1 + a) * x + (1 - a) * x * torch.erf(self.mu * (1 - a) * x)) / 2


def test_register_custom_activation_and_use_it() -> None:
    register_activation("smu", modules=[SMU], rectifier=True)
    try:
        model = nn.Sequential(nn.Linear(3, 5), SMU())
        with hs.HookManager(model) as hm:
            model(torch.randn(4, 3))
        df = hm.to_dataframe()
        assert list(df["kind"]) == ["smu"]
        assert not df["dead_ratio"].isna().any()
        with pytest.raises(ValueError, match="already registered"):
            register_activation("smu", modules=[SMU])
        register_activation("smu", modules=[SMU], replace=True)  # allowed with replace
    finally:
        unregister_activation("smu")
    assert activation_for_module(SMU()) is None


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"name": "Bad"}, ValueError, "lower case"),
        ({"name": ""}, TypeError, "`name`"),
        ({"name": "x1", "modules": [int]}, TypeError, "`modules`"),
        ({"name": "x2", "bounds": (1.0, 0.0)}, ValueError, "lo < hi"),
        ({"name": "x3", "bounds": "wide"}, TypeError, "`bounds`"),
        ({"name": "x4", "saturate": "top"}, ValueError, "`saturate`"),
    ],
)
def test_register_activation_validates(kwargs, exc, match) -> None:
    name = kwargs.pop("name")
    with pytest.raises(exc, match=match):
        register_activation(name, **kwargs)


def _all_values(dtype: torch.dtype) -> torch.Tensor:
    """Every finite value of a 16-bit float dtype."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    v = bits.view(dtype)
    return v[torch.isfinite(v)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t", [0.99, 0.01, -0.98, 0.98, 5.94, 1.0, -1.96])
def test_thresholds_are_exact_in_low_precision(dtype: torch.dtype, t: float) -> None:
    values = _all_values(dtype)
    exact = values.double()
    up = round_to_dtype(t, dtype, up=True)
    down = round_to_dtype(t, dtype, up=False)
    assert torch.equal(values >= up, exact >= t)
    assert torch.equal(values <= down, exact <= t)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t", [0.99, 0.01, -0.98, 0.98, 5.94, 1.0, -1.96, 0.0, 0.5])
def test_strict_thresholds_are_exact_in_low_precision(dtype: torch.dtype, t: float) -> None:
    values = _all_values(dtype)
    exact = values.double()
    above = strict_threshold(t, dtype, above=True)
    below = strict_threshold(t, dtype, above=False)
    assert torch.equal(values > above, exact >= t)
    assert torch.equal(values < below, exact <= t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_strict_thresholds_in_single_and_double(dtype: torch.dtype) -> None:
    t = 0.99
    above = strict_threshold(t, dtype, above=True)
    y_at = torch.tensor(t, dtype=dtype)  # t rounded to the dtype
    neighbours = torch.stack([torch.nextafter(y_at, torch.tensor(-1.0, dtype=dtype)), y_at,
                              torch.nextafter(y_at, torch.tensor(2.0, dtype=dtype))])  # fmt: skip
    assert torch.equal(neighbours > above, neighbours.double() >= t)

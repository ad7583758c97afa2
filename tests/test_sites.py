"""Where hooks go and what sites are called: module reuse, functional activations, outermost calls."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from conftest import ActivationCalls, FunctionalReLU, SharedReLU, definition_rows, hook_count

from hookscope import DeadReLU, HookManager


def layers_after_forward(model: nn.Module, x: torch.Tensor, **kwargs) -> list[str]:
    with HookManager(model, **kwargs) as hm:
        model(x)
    return list(hm.to_dataframe()["layer"])


def test_resnet18_has_17_call_sites_from_9_modules_and_backward_works() -> None:
    model = torchvision.models.resnet18(num_classes=10)
    relu_modules = [n for n, m in model.named_modules() if isinstance(m, nn.ReLU)]
    assert len(relu_modules) == 9
    with HookManager(model) as hm:
        model(torch.randn(2, 3, 32, 32)).sum().backward()  # in-place ReLUs: backward must still work
        hm.step()
    df = hm.to_dataframe()
    assert len(df) == 17
    assert list(df["layer"][:3]) == ["relu", "layer1.0.relu", "layer1.0.relu#1"]
    assert df["layer"].str.split("#").str[0].nunique() == 9
    assert set(df["layer"].str.split("#").str[0]) == set(relu_modules)
    assert df["grad_norm"].notna().all()
    # the same module sees another shape at its second call in the stem? no: each call site has its own units
    assert df.set_index("layer").loc["layer2.0.relu", "units"] == 128


def test_shared_module_call_sites() -> None:
    assert layers_after_forward(SharedReLU(), torch.randn(3, 4)) == ["act", "act#1"]


def test_googlenet_functional_relus() -> None:
    model = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=False).eval()
    layers = layers_after_forward(model, torch.randn(1, 3, 64, 64))
    assert len(layers) == 57
    assert layers[0] == "conv1.relu()"
    assert "inception3a.branch2.0.relu()" in layers
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())


def test_densenet121_module_sites_plus_one_functional() -> None:
    model = torchvision.models.densenet121(weights=None)
    layers = layers_after_forward(model, torch.randn(2, 3, 32, 32))
    assert len(layers) == 121
    functional = [name for name in layers if name.endswith("()")]
    assert functional == ["relu()"]  # F.relu in DenseNet.forward, i.e. in the root module
    assert layers[0] == "features.relu0"


def test_functional_spellings_and_names() -> None:
    model = FunctionalReLU()
    with HookManager(model) as hm:
        model(torch.randn(3, 4))
    df = hm.to_dataframe()
    assert list(df["layer"]) == ["relu()", "relu()#1", "relu_()", "sigmoid()"]
    assert list(df["kind"]) == ["relu", "relu", "relu", "sigmoid"]


def test_functional_false_ignores_functional_calls() -> None:
    assert layers_after_forward(FunctionalReLU(), torch.randn(3, 4), functional=False) == []


def test_module_forward_calling_f_relu_is_one_site() -> None:
    # nn.ReLU.forward itself calls F.relu: it must not count twice
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.GELU(approximate="tanh"))
    assert layers_after_forward(model, torch.randn(2, 2)) == ["1", "2"]


def test_third_party_gelu_with_tanh_inside_is_one_gelu_site() -> None:
    class NewGELUActivation(nn.Module):  # as in Hugging Face transformers
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 0.5 * x * (1.0 + torch.tanh(0.7978845608 * (x + 0.044715 * torch.pow(x, 3.0))))

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.act = NewGELUActivation()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(self.fc(x))

    with HookManager(Block()) as hm:
        hm.model(torch.randn(2, 4))
    df = hm.to_dataframe()
    assert list(df["layer"]) == ["act"] and list(df["kind"]) == ["gelu"]


def test_transformer_encoder_layer_default_activation_is_functional_relu() -> None:
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, batch_first=True)
    with HookManager(layer) as hm:
        layer(torch.randn(2, 5, 8))
    df = hm.to_dataframe()
    assert list(df["layer"]) == ["relu()"] and df["units"].iloc[0] == 16


def test_call_indices_restart_at_every_outermost_call() -> None:
    class Wrapper(nn.Module):  # Lightning-style: the root's forward is never called
        def __init__(self) -> None:
            super().__init__()
            self.net = SharedReLU()

    w = Wrapper()
    with HookManager(w) as hm:
        w.net(torch.randn(2, 4))
        w.net(torch.randn(2, 4))  # a second forward in the same step (gradient accumulation)
        hm.step()
    df = hm.to_dataframe()
    assert list(df["layer"]) == ["net.act", "net.act#1"]
    assert list(df["calls"]) == [2, 2]


def test_include_and_exclude_patterns() -> None:
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(1, 3, 32, 32)
    only_layer1 = layers_after_forward(model.eval(), x, include="layer1.*")
    assert only_layer1 == ["layer1.0.relu", "layer1.0.relu#1", "layer1.1.relu", "layer1.1.relu#1"]
    without_second_calls = layers_after_forward(model, x, exclude=["*#1"])
    assert len(without_second_calls) == 9
    # a pattern matching the module name also matches its later calls
    assert layers_after_forward(model, x, include=["layer1.0.relu"]) == ["layer1.0.relu", "layer1.0.relu#1"]


def test_include_that_matches_nothing_warns() -> None:
    model = SharedReLU()
    with HookManager(model, include="nothing*") as hm:
        model(torch.randn(2, 4))
        with pytest.warns(UserWarning, match="matched none"):
            hm.step()


def test_names_of_wrapped_models_are_unwrapped() -> None:
    inner = SharedReLU()
    model = torch.compile(inner, backend="eager")
    with HookManager(model, functional=False) as hm:
        inner(torch.randn(2, 4))
    assert list(hm.to_dataframe()["layer"]) == ["act", "act#1"]


def test_nested_activation_modules_are_not_separate_sites() -> None:
    class Gated(nn.SiLU):
        def __init__(self) -> None:
            super().__init__()
            self.gate = nn.Sigmoid()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.gate(x)

    model = nn.Sequential(Gated())
    with HookManager(model, [DeadReLU()]) as hm:
        model(torch.randn(2, 3))
    assert list(hm.to_dataframe()["layer"]) == ["0"]


def test_functional_site_in_a_module_called_from_several_places() -> None:
    class Act(nn.Module):  # not an activation class: its F.gelu is a functional site inside it
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.gelu(x)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = Act()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(self.a(x))

    assert layers_after_forward(Net(), torch.randn(2, 3)) == ["a.gelu()", "a.gelu()#1"]


# -- after discovery: hooks only where they are needed ---------------------------------------------------------


class _Inner(nn.Module):
    """Calls a functional activation itself and holds a child whose forward calls another one."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.act = FunctionalReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(F.gelu(self.fc(x)))


class _Zoo(nn.Module):
    """Module activations, a shared one, functional ones at two depths, and a module with no activation."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = _Inner()
        self.shared = SharedReLU()
        self.plain = nn.Sequential(nn.Linear(1, 4), nn.Linear(4, 4))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.plain(self.inner(x).sum(1, keepdim=True)))
        return torch.tanh(self.shared(h))


def _step_rows(model: nn.Module, steps: int, forwards_per_step: int = 1, **kwargs) -> list[list[tuple]]:
    """Per step, (layer, kind, calls, elements-derived columns) of every row: the same input at every step."""
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    with HookManager(model, **kwargs) as hm:
        for _ in range(steps):
            for _ in range(forwards_per_step):
                model(x).sum().backward()
            hm.step()
    df = hm.to_dataframe()
    steps_of = df["step"]
    cols = ["layer", "kind", "calls", "units", "dead_ratio", "inactive_fraction", "saturation_rate", "grad_norm"]
    df = df[cols].astype(object).where(df[cols].notna(), None)  # NaN == NaN for the comparisons
    return [[tuple(r) for r in df[steps_of == s].itertuples(index=False)] for s in range(steps)]


@pytest.mark.parametrize("forwards_per_step", [1, 2])
def test_every_step_after_discovery_finds_the_same_sites_and_values(forwards_per_step: int) -> None:
    model = _Zoo()
    per_step = _step_rows(model, 4, forwards_per_step)
    layers = [r[0] for r in per_step[0]]
    assert layers == [
        "inner.gelu()", "inner.act.relu()", "inner.act.relu()#1", "inner.act.relu_()", "inner.act.sigmoid()",
        "relu", "shared.act", "shared.act#1", "tanh()",
    ]  # fmt: skip
    for rows in per_step[1:]:
        assert rows == per_step[0]
    # and step 0 holds the definitions' values, from the activations of an uninstrumented copy
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    reference = _Zoo()
    reference.load_state_dict(model.state_dict())
    with ActivationCalls() as seen:
        for _ in range(forwards_per_step):
            reference(x).sum().backward()
    want = definition_rows(seen.calls, per_forward=9, forwards=forwards_per_step)
    stats = ["dead_ratio", "inactive_fraction", "saturation_rate", "grad_norm"]
    assert len(per_step[0]) == len(want)
    for got, expected in zip(per_step[0], want):
        assert got[1:3] == (expected["kind"], expected["calls"]), got
        values = [math.nan if v is None else v for v in got[4:]]
        assert values == pytest.approx([expected[k] for k in stats], rel=1e-6, abs=1e-12, nan_ok=True), got


def test_hooks_stay_only_where_sites_are_named_after_the_first_step() -> None:
    model = _Zoo()
    x = torch.randn(3, 4)
    with HookManager(model) as hm:
        model(x)
        # discovery: every module, before and after its forward; torch's own Linear layers after it only (nothing
        # runs inside them: they only tell the units of the activation after them)
        layers = [m for m in model.modules() if type(m) is nn.Linear]
        assert len(layers) == 8
        assert hook_count(model) == 2 * (len(list(model.modules())) - len(layers)) + len(layers)
        hm.step()
        hooked = {name for name, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks}
        # root (begins the pass, calls tanh), inner (calls gelu) and its children but its Linear, inner.act (calls
        # relu...), the activation modules; not shared, plain, nor any Linear
        assert hooked == {"", "inner", "inner.act", "relu", "shared", "shared.act", "plain"}
        model(x)
        hm.step()
    assert hook_count(model) == 0


def test_torch_layers_are_hooked_after_their_forward_and_only_when_they_tell_units() -> None:
    """torch's own layers are never on the module stack (nothing inside them names or records a site): one with
    features has a forward hook only, since it tells where the units of the activation after it sit; a dropout has
    none. The site still gets the Linear's units, not the size of dim 1 (the rule without a layer)."""
    model = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.0), nn.ReLU())
    x = torch.randn(2, 3, 4)  # (N, T, C): 3 units in dim 1, 6 in the last dim
    with HookManager(model, alerts=False) as hm:
        assert [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model] == [(0, 1), (0, 0), (1, 1)]
        y = model(x)
        y.sum().backward()
        hm.step()
        df = hm.to_dataframe()
    assert df[["layer", "units", "calls"]].values.tolist() == [["2", 6, 1]]
    assert df["inactive_fraction"].iloc[0] == pytest.approx(float((y <= 0).float().mean()))


def test_functional_false_keeps_only_activation_and_entry_modules_hooked() -> None:
    model = _Zoo()
    with HookManager(model, functional=False) as hm:
        model(torch.randn(3, 4))
        hm.step()
        hooked = {name for name, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks}
        assert hooked == {"", "relu", "shared.act"}


def test_a_functional_activation_that_appears_later_is_found_at_rediscovery(monkeypatch: pytest.MonkeyPatch) -> None:
    import hookscope.tracing

    monkeypatch.setattr(hookscope.tracing, "REDISCOVER_EVERY", 3)

    class Late(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.branch = nn.Linear(4, 4)
            self.use_branch = False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.fc(x))
            return F.silu(self.branch(h)) if self.use_branch else h

    model = Late()
    with HookManager(model) as hm:
        for step in range(6):
            model.use_branch = step >= 1
            model(torch.randn(2, 4))
            hm.step()
    df = hm.to_dataframe()
    # silu() runs from step 1 on, in the root that already calls relu: the mode covers it at once
    assert sorted(df[df["layer"] == "silu()"]["step"]) == [1, 2, 3, 4, 5]

    class Child(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.on = False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(x) if self.on else x

    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Sequential(Child()))
    with HookManager(net) as hm:
        for step in range(6):
            net[2][0].on = step >= 1
            net(torch.randn(2, 4))
            hm.step()
    df = hm.to_dataframe()
    # a module that had not called one in the first step is seen at the next discovery step (every 3 steps)
    assert sorted(df[df["layer"] == "2.0.sigmoid()"]["step"]) == [3, 4, 5]

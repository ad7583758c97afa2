"""What a new user meets first (issue 23.3 and 23.4): warnings that point at their own line, false warnings, sites
that are not layers of the network being trained, plots and the command line."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn as nn

import hookscope.warn
from hookscope import Alerts, HookManager, HookscopeWarning
from hookscope.alerts import DeadRatioRule, HookscopeAlert


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hookscope.warn, "_seen", set())  # warnings of earlier tests are not "seen" here


# ---------------------------------------------------------------------------------------------------------------
# warnings point at the user's line


class Deep(nn.Module):
    """An activation three modules deep (hooks run under several torch frames), after a transposed Linear: its
    unit dimension is ambiguous (batch 4 x 4 x 4), which hookscope warns about from inside the hook."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.inner = nn.Sequential(nn.Sequential(nn.ReLU()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self.lin(x).transpose(1, 2))


def _user_line(action: Callable[[], object], category: type[Warning]) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        action()
    return [w for w in caught if issubclass(w.category, category)]


def test_warnings_point_at_the_users_line() -> None:
    here = __file__
    # from a hook, inside nested modules: at model(x)
    model = Deep()
    hm = HookManager(model, alerts=False).attach()
    try:
        got = _user_line(lambda: model(torch.randn(4, 4, 4)), HookscopeWarning)
        assert got and "ambiguous" in str(got[0].message)
        assert [w.filename for w in got] == [here]
    finally:
        hm.detach()
    # from step(): `include` matched nothing; a model without activation sites
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    hm = HookManager(model, include="nothing*", alerts=False).attach()
    try:
        model(torch.randn(2, 2))
        got = _user_line(hm.step, HookscopeWarning)
        assert got and "matched none" in str(got[0].message) and [w.filename for w in got] == [here]
    finally:
        hm.detach()
    bare = nn.Linear(2, 2)
    with HookManager(bare, alerts=False) as hm:
        bare(torch.randn(2, 2))
        got = _user_line(hm.step, HookscopeWarning)
    assert got and "no activation site" in str(got[0].message) and [w.filename for w in got] == [here]
    # alerts, raised while step() checks them
    dead = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    with torch.no_grad():
        dead[0].weight.zero_()
        dead[0].bias.fill_(-1.0)
    alerts = Alerts(rules=[DeadRatioRule(0.1, column="dead_ratio")], every=1, log=False)
    with HookManager(dead, alerts=alerts) as hm:
        dead(torch.randn(2, 2))
        got = _user_line(hm.step, HookscopeAlert)
    assert len(got) == 1 and [w.filename for w in got] == [here]
    # a compiled model that ran before attaching ignores the hooks: said at the step() that notices it
    torch._dynamo.reset()
    own = type("SequentialOfItsOwn", (nn.Sequential,), {})  # (dynamo shares compiled code within a class)
    compiled = torch.compile(own(nn.Linear(4, 6), nn.ReLU()), backend="eager")
    compiled(torch.randn(2, 4))
    with HookManager(compiled, alerts=False) as hm:
        compiled(torch.randn(2, 4))
        got = _user_line(hm.step, HookscopeWarning)
    assert got and "before calling torch.compile" in str(got[0].message) and [w.filename for w in got] == [here]


def test_configuration_warnings_point_at_the_users_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from hookscope import kernels

    here = __file__
    # a misspelt HOOKSCOPE_KERNELS, read when the manager is built; then, from the first hook, why ATen is used
    monkeypatch.setenv(kernels.ENV_VAR, "natve")
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    made: list[HookManager] = []
    got = _user_line(lambda: made.append(HookManager(model, alerts=False)), HookscopeWarning)
    assert len(got) == 1 and "natve" in str(got[0].message) and got[0].filename == here
    hm = made[0].attach()
    try:
        got = _user_line(lambda: model(torch.randn(2, 2)), HookscopeWarning)
        assert len(got) == 1 and "use ATen operations" in str(got[0].message) and got[0].filename == here
    finally:
        hm.detach()


# ---------------------------------------------------------------------------------------------------------------
# plots and the command line


def _frame(rows: list[tuple[int, str, float]], metric: str = "dead_ratio") -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["step", "layer", metric]).assign(kind="relu")


def test_no_named_line_is_grey_and_no_two_share_a_colour() -> None:
    from matplotlib.colors import to_rgb

    from hookscope.reporters.plots import MAX_LABELLED, plot_lines

    # twelve layers, l00 the most dead: ten are named, in forward order
    frame = _frame([(s, f"l{i:02d}", (12 - i) / 12 * s / 3) for s in range(4) for i in range(12)])
    ax = plot_lines(frame, "dead_ratio").axes[0]
    named = {line.get_label(): to_rgb(line.get_color()) for line in ax.get_lines() if line.get_linewidth() > 1}
    assert list(named) == [f"l{i:02d}" for i in range(MAX_LABELLED)]
    assert len(set(named.values())) == MAX_LABELLED
    for layer, (r, g, b) in named.items():  # a grey has equal channels; the unnamed layers' grey is 0.72
        assert max(r, g, b) - min(r, g, b) > 0.2 or max(r, g, b) < 0.1, layer


def test_the_window_step_is_marked_on_dead_ratio_lines() -> None:
    from hookscope.errors import ConfigError
    from hookscope.reporters.plots import plot_lines

    # recorded steps 0, 2, 4, ... (every=2); with window=3 a unit that fired at step 0 can be dead from step 6
    frame = _frame([(s, "act", 0.0 if s < 6 else 0.5) for s in range(0, 12, 2)])
    ax = plot_lines(frame, "dead_ratio", window=3).axes[0]
    marks = [line for line in ax.get_lines() if line.get_label().startswith("step ")]
    assert len(marks) == 1 and list(marks[0].get_xdata()) == [6, 6]
    assert "units that fired" in marks[0].get_label()
    assert [t.get_text().split(":")[0] for t in ax.get_legend().get_texts()] == ["act", "step 6"]
    # without the window, the caption says where the jump comes from; other metrics have neither
    assert "before that, only units silent since the first step" in plot_lines(frame).axes[0].get_xlabel()
    other = frame.rename(columns={"dead_ratio": "inactive_fraction"})
    assert plot_lines(other, "inactive_fraction", window=3).axes[0].get_xlabel() == "step"
    with pytest.raises(ConfigError, match="`window` must be None or an int >= 1"):
        plot_lines(frame, window=0)


def test_version_and_plotting_the_confirmed_dead_ratio(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import hookscope
    from hookscope.cli import main
    from hookscope.reporters.plots import plot_heatmap

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"hookscope {hookscope.__version__}"
    # a unit that never fires, a unit that fires: confirmed dead ratio 0.5 once 128 outputs are silent
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.copy_(torch.tensor([-1.0, 1.0]))
    with HookManager(model, alerts=False) as hm:
        for _ in range(3):
            model(torch.randn(64, 2))
            hm.step()
    csv = tmp_path / "stats.csv"
    hm.to_csv(csv)
    frame = pd.read_csv(csv)
    assert frame["confirmed_dead_ratio"].tolist() == [0.0, 0.5, 0.5]  # 64, 128, 192 silent outputs
    for kind in ("heatmap", "lines"):
        out = tmp_path / f"{kind}.png"
        assert main(["plot", str(csv), "-o", str(out), "--metric", "confirmed_dead_ratio", "--kind", kind]) == 0
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    norm = plot_heatmap(frame, "confirmed_dead_ratio").axes[0].collections[0].norm
    assert (norm.vmin, norm.vmax) == (0.0, 1.0)  # a ratio: the full scale, not the data's range


# ---------------------------------------------------------------------------------------------------------------
# units: a layer with features that runs its activation inside decides


def _with_dead_channel(norm: nn.modules.batchnorm._BatchNorm) -> None:
    """Channel 0 always -1 (dead after a ReLU), the others +10 (always firing): gamma 0, beta -1 / +10."""
    with torch.no_grad():
        norm.weight.zero_()
        norm.bias.fill_(10.0)
        norm.bias[0] = -1.0


class NormAct1d(nn.BatchNorm1d):
    """A BatchNorm1d with its activation inside (timm's BatchNormAct2d pattern, on (N, C, L))."""

    def __init__(self, features: int) -> None:
        super().__init__(features)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


def _record(model: nn.Module, x: torch.Tensor) -> tuple[pd.DataFrame, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with HookManager(model, alerts=False) as hm:
            model(x).sum().backward()
            hm.step()
    return hm.to_dataframe(), [str(w.message) for w in caught if issubclass(w.category, HookscopeWarning)]


def test_a_layer_with_features_and_its_activation_inside_decides_the_unit_dim() -> None:
    # (N, C, L) with L == C: the conv's output is not the ReLU's input (the norm runs in between), and by size alone
    # dims 1 and 2 both hold 6: the shape rule took the last dim (6 positions, 0% dead). The norm decides: dim 1.
    model = nn.Sequential(nn.Conv1d(2, 6, 3, padding=1), NormAct1d(6))
    _with_dead_channel(model[1])
    frame, warned = _record(model, torch.randn(4, 2, 6))
    assert warned == []
    assert frame[["layer", "units", "dead_ratio"]].values.tolist() == [["1.act", 6, 1 / 6]]


def test_timm_batchnormact2d_gives_no_ambiguous_warning() -> None:
    timm = pytest.importorskip("timm")
    # 8 channels at 8 x 8: dims 1, 2 and 3 all have the conv's 8 features
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), timm.layers.BatchNormAct2d(8, act_layer=nn.ReLU))
    _with_dead_channel(model[1])
    frame, warned = _record(model, torch.randn(2, 3, 8, 8))
    assert warned == []
    assert frame[["layer", "units", "dead_ratio"]].values.tolist() == [["1.act", 8, 1 / 8]]


# ---------------------------------------------------------------------------------------------------------------
# outputs that do not require grad while the model trains are not layers of the network being trained


class Ranker(nn.Module):
    """A trained ReLU, then a sigmoid of the detached scores that only ranks them (Faster R-CNN's RPN pattern)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.act = nn.ReLU()
        self.score = nn.Linear(4, 5)
        self.rank = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.score(self.act(self.fc(x)))
        top = torch.sigmoid(scores.detach()).topk(2, dim=1).indices  # the functional spelling
        self.rank(scores.detach())  # and a module's
        return scores.gather(1, top)


def test_detached_outputs_are_not_sites_while_training_but_are_in_inference() -> None:
    torch.manual_seed(0)
    model = Ranker()
    frame, warned = _record(model, torch.randn(8, 3))
    assert warned == []
    assert frame["layer"].tolist() == ["act"] and frame["grad_norm"].notna().all()
    # the same model in inference, as documented: eval mode, or torch.no_grad() in training mode
    for evaluate in (True, False):
        model.train(not evaluate)
        with HookManager(model, alerts=False) as hm, torch.no_grad():
            model(torch.randn(8, 3))
            hm.step()
        assert hm.to_dataframe()["layer"].tolist() == ["act", "sigmoid()", "rank"]


def test_a_frozen_part_is_left_out_while_training() -> None:
    torch.manual_seed(0)
    frozen = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    frozen.requires_grad_(False)
    model = nn.Sequential(frozen, nn.Linear(4, 2), nn.ReLU())
    x3 = torch.randn(8, 3)
    frame, warned = _record(model, x3)
    assert warned == [] and frame["layer"].tolist() == ["2"]
    # a model that trains nothing (all frozen, or without parameters) is recorded whole, in any mode
    for model, x, sites in ((nn.Sequential(nn.ReLU(), nn.Sigmoid()), torch.randn(8, 4), 2), (frozen, x3, 1)):
        assert model.training
        with HookManager(model, alerts=False) as hm:
            model(x)
            hm.step()
        assert len(hm.to_dataframe()) == sites


def test_a_pass_is_a_training_pass_by_one_rule_for_evaluation_and_for_parts_outside_training() -> None:
    """Fine-tuning a trunk called directly while the model around it is in eval mode (``model.eval();
    model.trunk.train()``): the pass trains (the module that begins it is in train mode, with gradients), so it is
    recorded and its frozen stem's ReLU, whose output has no gradient, is outside the network being trained."""
    torch.manual_seed(0)
    stem = nn.Sequential(nn.Linear(3, 4), nn.ReLU()).requires_grad_(False)
    trunk = nn.Sequential(stem, nn.Linear(4, 2), nn.ReLU())
    model = nn.Sequential(trunk, nn.Linear(2, 1))
    model.eval()
    trunk.train()
    with HookManager(model, alerts=False) as hm:
        for _ in range(2):
            trunk(torch.randn(8, 3)).sum().backward()
            hm.step()
    frame = hm.to_dataframe()
    assert frame["layer"].tolist() == ["0.2", "0.2"] and frame["grad_norm"].notna().all()

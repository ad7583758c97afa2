"""Statistics from first principles: hand-built weights and inputs, expected values worked out by hand or by
autograd on an uninstrumented copy."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn as nn

import hookscope as hs
from hookscope import DeadReLU, GradientNorm, HookManager, Saturation

# every test runs on both paths: the native kernels and the ATen formulation
pytestmark = pytest.mark.usefixtures("each_path")


def three_unit_relu() -> nn.Sequential:
    """y = relu(W x + b) with unit 0 = x, unit 1 = -x, unit 2 = -1 (always dead)."""
    lin = nn.Linear(1, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0], [-1.0], [0.0]]))
        lin.bias.copy_(torch.tensor([0.0, 0.0, -1.0]))
    return nn.Sequential(lin, nn.ReLU())


def col(*xs: float) -> torch.Tensor:
    return torch.tensor(xs).reshape(-1, 1)


def test_inactive_fraction_and_dead_ratio_by_hand() -> None:
    model = three_unit_relu()
    with HookManager(model, [DeadReLU()]) as hm:
        model(col(1.0, -2.0, 3.0, 0.0))
        hm.step()
    row = hm.to_dataframe().iloc[0]
    # unit 0: [1, 0, 3, 0] -> 2 inactive; unit 1: [0, 2, 0, 0] -> 3; unit 2: all 0 -> 4. 9 of 12.
    assert row["inactive_fraction"] == 9 / 12
    assert row["dead_ratio"] == 1 / 3
    assert row["units"] == 3 and row["calls"] == 1
    assert math.isnan(row["saturation_rate"]) and math.isnan(row["grad_norm"])  # collectors not attached


def test_all_calls_of_a_step_count_together() -> None:
    model = three_unit_relu()
    with HookManager(model, [DeadReLU()]) as hm:
        model(col(1.0, 2.0))  # unit 1 and 2 inactive: 4 of 6
        model(col(-1.0))  # unit 0 and 2 inactive: 2 of 3; unit 1 fires
        hm.step()
    row = hm.to_dataframe().iloc[0]
    assert row["calls"] == 2
    assert row["inactive_fraction"] == 6 / 9
    assert row["dead_ratio"] == 1 / 3  # only unit 2 never fired in the step


@pytest.mark.parametrize(
    ("window", "expected"),
    [
        # step inputs: [1, 2] (unit 1 silent), [-1] (unit 0 silent), [-1] (unit 0 silent); unit 2 always dead
        (1, [2 / 3, 2 / 3, 2 / 3]),
        (2, [2 / 3, 1 / 3, 2 / 3]),
        (3, [2 / 3, 1 / 3, 1 / 3]),
    ],
)
def test_dead_window(window: int, expected: list[float]) -> None:
    model = three_unit_relu()
    with HookManager(model, [DeadReLU(window=window)]) as hm:
        for xs in [(1.0, 2.0), (-1.0,), (-1.0,)]:
            model(col(*xs))
            hm.step()
    assert list(hm.to_dataframe()["dead_ratio"]) == pytest.approx(expected, abs=0)


@pytest.mark.parametrize("window", [0, -3])
def test_window_must_be_positive(window: int) -> None:
    with pytest.raises(ValueError, match="`window`"):
        DeadReLU(window=window)
    with pytest.raises(TypeError, match="`window`"):
        DeadReLU(window=1.5)  # type: ignore[arg-type]


def test_rectifiers_other_than_relu_use_output_le_zero() -> None:
    # leaky_relu and gelu outputs are negative for negative inputs: inactive; exactly zero input -> 0: inactive
    x = torch.tensor([[-2.0, 0.0, 0.5, 3.0]])
    for act in (nn.LeakyReLU(0.1), nn.GELU(), nn.ELU(), nn.SiLU(), nn.Mish(), nn.Hardswish()):
        model = nn.Sequential(act)
        with HookManager(model, [DeadReLU()]) as hm:
            model(x)
        row = hm.to_dataframe().iloc[0]
        assert row["inactive_fraction"] == 2 / 4, act
        assert row["units"] == 4 and row["dead_ratio"] == 0.5, act  # 2-D output: units are the 4 columns


def test_dead_ratio_is_nan_for_non_rectifiers_and_saturation_for_unbounded() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 3), nn.ReLU(), nn.Softmax(dim=1))
    with HookManager(model) as hm:
        model(torch.randn(5, 2))
    df = hm.to_dataframe().set_index("layer")
    assert math.isnan(df.loc["1", "dead_ratio"]) and not math.isnan(df.loc["1", "saturation_rate"])
    assert not math.isnan(df.loc["3", "dead_ratio"]) and math.isnan(df.loc["3", "saturation_rate"])
    assert math.isnan(df.loc["4", "dead_ratio"]) and math.isnan(df.loc["4", "saturation_rate"])


def saturation_of(act: nn.Module, outputs_from: torch.Tensor, eps: float = 0.01) -> float:
    model = nn.Sequential(act)
    with HookManager(model, [Saturation(eps=eps)]) as hm:
        model(outputs_from)
    return float(hm.to_dataframe()["saturation_rate"].iloc[0])


def test_tanh_saturation_band() -> None:
    ys = torch.tensor([[0.97, 0.979, 0.981, 0.999, -0.99, 0.5]], dtype=torch.float64)
    # |y| >= 0.98: 0.981, 0.999, -0.99
    assert saturation_of(nn.Tanh(), torch.atanh(ys)) == 3 / 6


def test_sigmoid_saturation_band_and_eps() -> None:
    ys = torch.tensor([[0.005, 0.011, 0.5, 0.95, 0.989, 0.995]], dtype=torch.float64)
    logits = torch.log(ys / (1 - ys))
    assert saturation_of(nn.Sigmoid(), logits) == 2 / 6  # y <= 0.01 or y >= 0.99
    assert saturation_of(nn.Sigmoid(), logits, eps=0.1) == 5 / 6  # y <= 0.1 or y >= 0.9


def test_relu6_saturates_at_its_upper_bound_only() -> None:
    x = torch.tensor([[0.0, -1.0, 5.93, 5.95, 7.0, 3.0]])
    assert saturation_of(nn.ReLU6(), x) == 2 / 6  # y >= 5.94


def test_hardtanh_uses_its_own_range() -> None:
    x = torch.tensor([[-3.0, -1.97, -1.95, 0.0, 1.95, 1.97, 5.0]])
    assert saturation_of(nn.Hardtanh(-2.0, 2.0), x) == 4 / 7  # band 0.04 of a range of 4


def test_functional_hardtanh_reads_bounds_from_the_call() -> None:
    class M(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.hardtanh(x, -2.0, 2.0)

    x = torch.tensor([[-3.0, -1.97, -1.95, 0.0, 1.95, 1.97, 5.0]])
    model = M()
    with HookManager(model, [Saturation()]) as hm:
        model(x)
    assert hm.to_dataframe()["saturation_rate"].iloc[0] == 4 / 7


def test_hardsigmoid_and_softsign_are_bounded() -> None:
    # hardsigmoid(x) = clamp(x / 6 + 0.5, 0, 1): x <= -2.94 or x >= 2.94 is saturated
    assert saturation_of(nn.Hardsigmoid(), torch.tensor([[-3.0, -2.9, 0.0, 2.9, 3.0]])) == 2 / 5
    # softsign(x) = x / (1 + |x|) >= 0.98 from x = 49
    assert saturation_of(nn.Softsign(), torch.tensor([[-60.0, -40.0, 0.0, 40.0, 60.0]])) == 2 / 5


@pytest.mark.parametrize("eps", [0.0, 0.5, -0.1, 0.7, float("nan")])
def test_eps_must_be_in_open_interval(eps: float) -> None:
    with pytest.raises(ValueError, match="`eps`"):
        Saturation(eps=eps)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    ("act", "lo", "hi", "sides"),
    [
        (nn.Sigmoid(), 0.0, 1.0, "both"),
        (nn.Tanh(), -1.0, 1.0, "both"),
        (nn.ReLU6(), 0.0, 6.0, "upper"),
        (nn.Hardtanh(-2.0, 3.0), -2.0, 3.0, "both"),
    ],
)
def test_saturation_is_exact_in_every_dtype(
    dtype: torch.dtype, act: nn.Module, lo: float, hi: float, sides: str
) -> None:
    x = torch.linspace(-8, 8, 40001).reshape(1, -1).to(dtype)
    y = act(x).double()  # the outputs the model produces, compared in exact arithmetic
    band = 0.01 * (hi - lo)
    saturated = y >= hi - band
    if sides == "both":
        saturated |= y <= lo + band
    assert saturation_of(act, x) == float(saturated.double().mean())


def test_counts_do_not_lose_precision_in_half() -> None:
    # 2**21 elements, 60% negative: a bf16 or fp16 sum of indicator values could not count them exactly
    n = 2**21
    x = torch.ones(1, n, dtype=torch.float16)
    x[0, : int(0.6 * n) + 1] = -1.0
    model = nn.Sequential(nn.ReLU())
    with HookManager(model, [DeadReLU()], unit_dim=0) as hm:
        model(x)
    assert hm.to_dataframe()["inactive_fraction"].iloc[0] == (int(0.6 * n) + 1) / n


# --------------------------------------------------------------------------------------------------------------
# gradient norm


def reference_grad_norms(model: nn.Module, xs: list[torch.Tensor]) -> list[float]:
    """sqrt(sum over passes of ||dL/dy||^2) for each activation output, by autograd with retain_grad."""
    model = copy.deepcopy(model)
    outs: list[list[torch.Tensor]] = [[] for _ in xs]
    current: list[torch.Tensor] = []

    def keep(m: nn.Module, i: object, o: torch.Tensor) -> None:
        o.retain_grad()
        current.append(o)

    for m in model.modules():
        if isinstance(m, (nn.ReLU, nn.Tanh, nn.Sigmoid)):
            m.register_forward_hook(keep)
    for k, x in enumerate(xs):
        current.clear()
        model(x).pow(2).sum().backward()
        outs[k] = list(current)
    return [math.sqrt(sum(float(outs[k][j].grad.pow(2).sum()) for k in range(len(xs)))) for j in range(len(outs[0]))]


def test_grad_norm_matches_autograd() -> None:
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 1), nn.Sigmoid())
    x = torch.randn(7, 3)
    expected = reference_grad_norms(model, [x])
    with HookManager(model, [GradientNorm()]) as hm:
        model(x).pow(2).sum().backward()
        hm.step()
    assert list(hm.to_dataframe()["grad_norm"]) == pytest.approx(expected, rel=1e-6)


class SummedOutput(nn.Module):
    """The activation's output is summed over the batch: its gradient is an expanded (stride 0) tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 5)
        self.act = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.lin(x)).sum(dim=0)


def dense_tanh() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("make", "strided"), [(dense_tanh, False), (SummedOutput, True)])
def test_grad_norm_of_contiguous_and_strided_gradients(
    dtype: torch.dtype, make: Callable[[], nn.Module], strided: bool
) -> None:
    torch.manual_seed(0)
    model = make().to(dtype)
    x = torch.randn(7, 5, dtype=dtype)
    expected = reference_grad_norms(model, [x])
    seen: list[bool] = []  # whether the gradient reaching the activation was contiguous (which path ran)
    act = next(m for m in model.modules() if isinstance(m, nn.Tanh))

    def spy(module: nn.Module, args: object, out: torch.Tensor) -> None:
        out.register_hook(lambda g: seen.append(g.is_contiguous()))

    act.register_forward_hook(spy)
    with HookManager(model, [GradientNorm()]) as hm:
        model(x).pow(2).sum().backward()
        hm.step()
    assert seen == [not strided]
    rel = 1e-6 if dtype == torch.float32 else 1e-12
    assert hm.to_dataframe()["grad_norm"].iloc[0] == pytest.approx(expected[0], rel=rel)


def test_gradient_accumulation_sums_squares_over_backward_passes() -> None:
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 1))
    xs = [torch.randn(4, 3), torch.randn(4, 3)]
    expected = reference_grad_norms(model, xs)
    with HookManager(model, [GradientNorm()]) as hm:
        for x in xs:
            model(x).pow(2).sum().backward()
        hm.step()
    df = hm.to_dataframe()
    assert list(df["layer"]) == ["1"]  # two forwards in one step are the same site, not "1#1"
    assert df["calls"].iloc[0] == 2
    assert df["grad_norm"].iloc[0] == pytest.approx(expected[0], rel=1e-6)


def test_in_place_relu_gives_the_same_gradient_norms() -> None:
    plain = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 1))
    inplace = copy.deepcopy(plain)
    inplace[1] = nn.ReLU(inplace=True)
    x = torch.randn(6, 3)
    expected = reference_grad_norms(plain, [x])
    with HookManager(inplace) as hm:
        inplace(x).pow(2).sum().backward()
        hm.step()
    assert hm.to_dataframe()["grad_norm"].iloc[0] == pytest.approx(expected[0], rel=1e-6)


class ScaledInPlace(nn.Module):
    """GELU (it saves its input, not its output), then the output multiplied by 3 in place: dL/d(GELU output) is
    3 * dL/d(result)."""

    def __init__(self) -> None:
        super().__init__()
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x).mul_(3.0)


@pytest.fixture(params=["private", "public"])
def hook_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """hookscope's gradient hooks through torch's private hook dict (the fast path) and through the public
    ``register_hook`` (what a torch without that dict gets)."""
    monkeypatch.setattr(hs.recording, "_private_hooks", request.param == "private")


@pytest.mark.usefixtures("hook_path")
def test_gradient_hooks_live_beside_the_users_own() -> None:
    # hookscope's gradient hook shares the output's hook dict with the user's: one registered before it, one after,
    # one removed at once. Each fires as torch says, and hookscope's norm is that of dL/dy with y the activation's
    # output as it left the module (before the in-place multiplication): 3 * w element by element.
    model = ScaledInPlace()
    x = torch.tensor([[1.0, -2.0, 3.0, 4.0]], requires_grad=True)
    w = torch.tensor([[1.0, 2.0, 2.0, 4.0]])
    seen: dict[str, list[torch.Tensor]] = {"before": [], "after": [], "removed": []}

    def user(label: str) -> Callable[[nn.Module, object, torch.Tensor], None]:
        def hook(module: nn.Module, args: object, out: torch.Tensor) -> None:
            handle = out.register_hook(seen[label].append)
            if label == "removed":
                handle.remove()

        return hook

    model.act.register_forward_hook(user("before"))
    with HookManager(model, [GradientNorm()], alerts=False) as hm:
        model.act.register_forward_hook(user("after"))
        model.act.register_forward_hook(user("removed"))
        (model(x) * w).sum().backward()
        hm.step()
    assert [len(v) for v in seen.values()] == [1, 1, 0]
    assert seen["before"][0].tolist() == seen["after"][0].tolist() == [[3.0, 6.0, 6.0, 12.0]]
    reference = x.detach().clone().requires_grad_()
    (torch.nn.functional.gelu(reference).mul_(3.0) * w).sum().backward()
    assert x.grad is not None and reference.grad is not None and torch.equal(x.grad, reference.grad)
    assert hm.to_dataframe()["grad_norm"].iloc[0] == pytest.approx(math.sqrt(9 + 36 + 36 + 144), rel=1e-12)


@pytest.mark.usefixtures("hook_path")
def test_gradient_hooks_on_an_in_place_activation_of_a_view() -> None:
    # relu_ on a view of a tensor that requires grad: the output's history is rebased in place; the hook reports
    # dL/dy = w for the activation's output and training sees the same gradients as without hookscope
    def forward(t: torch.Tensor) -> torch.Tensor:
        return torch.relu_(t.clone()[:, :3])

    class ViewRelu(nn.Module):
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return forward(t)

    x = torch.tensor([[1.0, -2.0, 3.0, 4.0], [-1.0, 2.0, 0.5, 1.0]], requires_grad=True)
    w = torch.tensor([[2.0, 1.0, 2.0], [4.0, 2.0, 1.0]])
    reference = x.detach().clone().requires_grad_()
    (forward(reference) * w).sum().backward()
    model = ViewRelu()
    with HookManager(model, [GradientNorm()], alerts=False) as hm:
        (model(x) * w).sum().backward()
        hm.step()
    assert x.grad is not None and reference.grad is not None and torch.equal(x.grad, reference.grad)
    assert hm.to_dataframe()["grad_norm"].iloc[0] == pytest.approx(float(w.norm()), rel=1e-6)


class LateSites(nn.Module):
    """Site ``a`` (relu, 4 units) from the first step; from ``late`` on, a relu of 3000 units and 17 tanh sites as
    well: the state tensors of every collector grow (past 1024 units when the wide relu is bound, in the middle of a
    forward pass; past 16 sites when the step closes, for the collectors the tanh sites do not concern) and move in
    memory, after ``a``'s prepared kernel calls were made for their old addresses."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.ReLU()
        self.wide = nn.ReLU()
        self.t = nn.ModuleList(nn.Tanh() for _ in range(17))
        self.late = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.a(x).sum()
        if self.late:
            out = out + self.wide(-torch.ones(2, 3000)).sum() + sum(t(torch.full((2, 3), 10.0)).sum() for t in self.t)
        return out


def test_statistics_stay_exact_when_the_state_grows_under_prepared_calls() -> None:
    # a: rows [1, -1, 2, -3] and [2, -1, 0, 5]: 4 of 8 elements inactive, unit 1 never fires
    x = torch.tensor([[1.0, -1.0, 2.0, -3.0], [2.0, -1.0, 0.0, 5.0]], requires_grad=True)
    model = LateSites()
    with HookManager(model, [DeadReLU(), Saturation(), GradientNorm()], alerts=False) as hm:
        for step in range(40):  # the ring of 16 rows turns over twice after the growth
            model.late = step >= 3
            for _ in range(2):  # two passes: the second runs `a` after the first bound the new sites
                model(x).backward()  # dL/da = 1 everywhere: ||.||^2 = 8 per pass
            hm.step()
    df = hm.to_dataframe()
    a = df[df["layer"] == "a"]
    assert len(a) == 40
    assert (a["inactive_fraction"] == 4 / 8).all()
    assert (a["dead_ratio"] == 1 / 4).all()  # unit 1
    assert np.allclose(a["grad_norm"], 4.0, rtol=1e-6, atol=0)
    late = df[df["step"] >= 3]
    assert len(late) == 37 * 19
    assert (late[late["layer"].str.startswith("t.")]["saturation_rate"] == 1.0).all()  # tanh(10) = 1 > 0.98
    assert (late[late["layer"] == "wide"]["dead_ratio"] == 1.0).all()


def test_outputs_that_change_batch_size_and_layout_are_each_counted() -> None:
    # one site sees a batch of 4, a batch of 3 and a channels_last batch in one step: each with its own
    # prepared call; counts from boolean masks of the very inputs
    gen = torch.Generator().manual_seed(4)
    xs = [torch.randn(4, 5, 3, 3, generator=gen)]
    xs.append(torch.randn(4, 5, 3, 3, generator=gen).contiguous(memory_format=torch.channels_last))
    xs.append(torch.randn(3, 5, 3, 3, generator=gen))
    for x in xs:
        x[:, 2] = -x[:, 2].abs()  # channel 2 dead: read in the wrong layout, it would fire
    model = nn.Sequential(nn.ReLU())
    with HookManager(model, [DeadReLU()], alerts=False) as hm:
        for _ in range(3):
            for x in xs:
                model(x)
            hm.step()
    rows = hm.to_dataframe()
    inactive = sum(int((x <= 0).sum()) for x in xs)
    elements = sum(x.numel() for x in xs)
    assert list(rows["inactive_fraction"]) == [inactive / elements] * 3
    fired = torch.stack([(x > 0).any(dim=(0, 2, 3)) for x in xs]).any(dim=0)
    assert fired.tolist() == [True, True, False, True, True]
    assert list(rows["dead_ratio"]) == [1 / 5] * 3


def test_prepared_calls_follow_the_thread_count() -> None:
    # the prepared calls hold torch's thread count when made: a new count makes new calls at the next step (an empty
    # one too), also for the rows of the state ring that already had one (16 rows: 17 steps at each count)
    model = nn.Sequential(nn.Linear(4, 300), nn.ReLU())
    x = torch.randn(256, 4)  # 76,800 elements: a call that may use several threads
    threads = max(torch.get_num_threads(), 2)
    seen = []
    try:
        with HookManager(model, [DeadReLU()], alerts=False) as hm:
            recorder = hm._recorder
            if recorder.kernels.name != "native":
                pytest.skip("the ATen path prepares nothing")
            for n in (threads, 1, threads):
                torch.set_num_threads(n)
                hm.step()  # an empty step: the count is read when a step closes
                for _ in range(17):
                    model(x)
                    entry = recorder._slots[0].out_pass.calls[recorder._banks[0].closed_rows]
                    seen.append(entry[2]._args.threads)
                    hm.step()
    finally:
        torch.set_num_threads(threads)
    assert seen == [threads] * 17 + [1] * 17 + [threads] * 17
    y = torch.relu(model[0](x))
    assert set(hm.to_dataframe()["inactive_fraction"]) == {float((y <= 0).sum()) / y.numel()}


class RaisesAtWide(GradientNorm):
    """A custom collector whose plan for the site `wide` raises once: after DeadReLU's state grew for it."""

    armed = False

    def fused_gradient(self, site):  # type: ignore[no-untyped-def]
        if self.armed and site.layer == "wide":
            self.armed = False
            raise RuntimeError("planted")
        return super().fused_gradient(site)


def test_a_collector_that_raises_while_the_state_grows_leaves_no_stale_prepared_call() -> None:
    # the ring turns over (every row of `a` has a prepared call), then binding `wide` grows DeadReLU's state and a
    # collector raises: the forward raises, the user goes on, and `a`'s next output must land in the new state
    x = torch.tensor([[1.0, -1.0, 2.0, -3.0], [2.0, -1.0, 0.0, 5.0]])
    model = LateSites()
    flaky = RaisesAtWide()
    with HookManager(model, [DeadReLU(), flaky], alerts=False) as hm:
        for _ in range(20):
            model(x)
            hm.step()
        flaky.armed, model.late = True, True
        with pytest.raises(RuntimeError, match="planted"):
            model(x)
        model.late = False
        model(x)  # the same step: `a` again
        hm.step()
    a = hm.to_dataframe().query("layer == 'a'")
    assert len(a) == 21 and a["calls"].iloc[-1] == 2
    assert (a["inactive_fraction"] == 4 / 8).all()  # a count lost to a stale call would raise it to 12/16
    assert (a["dead_ratio"] == 1 / 4).all()


def test_half_precision_gradients_do_not_overflow() -> None:
    # 4096 gradients of 300 in fp16: the squared sum (3.7e8) overflows fp16 (max 65504); the norm is 19200
    x = torch.ones(1, 4096, dtype=torch.float16, requires_grad=True)
    model = nn.Sequential(nn.ReLU())
    with HookManager(model, [GradientNorm()]) as hm:
        (model(x) * torch.tensor(300.0, dtype=torch.float16)).sum().backward()
        hm.step()
    assert hm.to_dataframe()["grad_norm"].iloc[0] == pytest.approx(19200.0, rel=1e-6)


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_half_precision_gradient_norms_above_the_fp16_range(strided: bool) -> None:
    # 4096 fp16 gradients of 2000: the squares (4e6 each) and the norm itself (128,000) exceed fp16's 65,504.
    # Strided: the output is summed over the batch, so its gradient is an expanded (stride 0) tensor.
    x = torch.ones(64, 64, dtype=torch.float16, requires_grad=True)
    seen: list[torch.Tensor] = []

    def spy(module: nn.Module, args: object, out: torch.Tensor) -> None:
        out.register_hook(seen.append)

    model = nn.Sequential(nn.ReLU())
    model[0].register_forward_hook(spy)
    weight = torch.tensor(2000.0, dtype=torch.float16)
    with HookManager(model, [GradientNorm()]) as hm:
        y = model(x)
        ((y.sum(dim=0) if strided else y) * weight).sum().backward()
        hm.step()
    (g,) = seen
    assert g.dtype == torch.float16 and g.is_contiguous() == (not strided)
    expected = float(g.double().norm())  # float64, from the very gradient the hooks saw
    assert expected == 2000.0 * 64 > 65504
    assert hm.to_dataframe()["grad_norm"].iloc[0] == pytest.approx(expected, rel=1e-6)


def test_grad_norm_is_nan_without_backward() -> None:
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU())
    with HookManager(model) as hm:
        model(torch.randn(2, 3)).sum().backward()
        hm.step()
        model(torch.randn(2, 3))  # a training forward whose backward never runs (an evaluation would not count)
        hm.step()
    df = hm.to_dataframe()
    assert not math.isnan(df["grad_norm"].iloc[0])
    assert math.isnan(df["grad_norm"].iloc[1]) and not math.isnan(df["inactive_fraction"].iloc[1])


# --------------------------------------------------------------------------------------------------------------
# units


def units_of(model: nn.Module, x: torch.Tensor, **kwargs) -> list[int]:
    with HookManager(model, [DeadReLU()], **kwargs) as hm:
        model(x)
    return list(hm.to_dataframe()["units"])


def test_units_are_channels_for_2d_4d_5d_and_last_dim_for_3d() -> None:
    relu = nn.Sequential(nn.ReLU())
    assert units_of(relu, torch.randn(2, 7)) == [7]
    assert units_of(relu, torch.randn(2, 7, 3, 3)) == [7]
    assert units_of(relu, torch.randn(2, 7, 3, 3, 3)) == [7]
    assert units_of(relu, torch.randn(2, 5, 7)) == [7]  # (B, T, F)
    assert units_of(relu, torch.randn(9)) == [9]
    assert units_of(relu, torch.randn(())) == [1]


def test_unit_dim_override() -> None:
    model = nn.Sequential(nn.Conv1d(2, 4, 1), nn.ReLU(), nn.Linear(6, 6), nn.ReLU())
    x = torch.randn(3, 2, 6)  # conv output (N, C=4, L=6), then a Linear on its last dim: (N, 4, 6)
    assert units_of(model, x) == [4, 6]  # inferred from the layer before each: Conv1d channels, Linear features
    assert units_of(model, x, unit_dim=2) == [6, 6]
    assert units_of(model, x, unit_dim={"3": 1}) == [4, 4]


def test_dead_units_counted_per_channel_of_a_conv() -> None:
    conv = nn.Conv2d(1, 3, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, -1.0, 0.0]).reshape(3, 1, 1, 1))
        conv.bias.zero_()
    model = nn.Sequential(conv, nn.ReLU())
    x = torch.rand(2, 1, 4, 4) + 0.1  # positive: channel 0 fires everywhere, channels 1 and 2 never
    with HookManager(model, [DeadReLU()]) as hm:
        model(x)
    row = hm.to_dataframe().iloc[0]
    assert row["units"] == 3 and row["dead_ratio"] == 2 / 3 and row["inactive_fraction"] == 2 / 3


def test_custom_collector_receives_outputs_and_reports_its_column() -> None:
    class MeanActivation(hs.Collector):
        columns = ("mean_activation",)

        def __init__(self) -> None:
            super().__init__()
            self.add_state("total")

        def update(self, state, output, site):
            state["total"].add_(output.sum(dtype=torch.float64))

        def compute(self, record):
            return {"mean_activation": record["total"] / record["elements"]}

    model = nn.Sequential(nn.ReLU())
    with HookManager(model, [MeanActivation(), DeadReLU()]) as hm:
        model(torch.tensor([[-1.0, 2.0, 4.0]]))
        model(torch.tensor([[3.0, -5.0, 0.0]]))
        hm.step()
    df = hm.to_dataframe()
    assert list(df.columns)[-1] == "mean_activation"
    assert df["mean_activation"].iloc[0] == 9.0 / 6
    assert np.isnan(df["saturation_rate"].iloc[0])


def test_a_site_with_zero_units_is_bound_once() -> None:
    # an output with zero units (here (4, 0)) is a site like any other: each call reaches each collector once
    class CountCalls(hs.Collector):
        columns = ("seen",)

        def __init__(self) -> None:
            super().__init__()
            self.add_state("seen")
            self.updates = 0

        def update(self, state, output, site):
            self.updates += 1
            state["seen"].add_(1.0)

        def compute(self, record):
            return {"seen": record["seen"]}

    counter = CountCalls()
    model = nn.Sequential(nn.ReLU())
    with HookManager(model, [counter, DeadReLU()], alerts=False) as hm:
        for _ in range(3):
            model(torch.randn(4, 0))
            model(torch.randn(4, 0))
            hm.step()
    df = hm.to_dataframe()
    assert counter.updates == 6
    assert df["seen"].tolist() == [2.0, 2.0, 2.0] and df["units"].tolist() == [0, 0, 0]


class Clip01(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(0.0, 1.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("side", ["lower", "upper", "both"])
def test_custom_bounded_activation_with_each_saturation_side(dtype: torch.dtype, side: str) -> None:
    hs.register_activation("clip01", modules=[Clip01], bounds=(0.0, 1.0), saturate=side, replace=True)
    try:
        x = torch.linspace(-0.5, 1.5, 20001).reshape(1, -1).to(dtype)
        y = x.clamp(0, 1).double()
        low, high = y <= 0.01, y >= 0.99
        expected = {"lower": low, "upper": high, "both": low | high}[side]
        assert saturation_of(Clip01(), x) == float(expected.double().mean())
    finally:
        hs.activations.unregister_activation("clip01")


SHAPES = [(5, 7, 2, 2), (64, 200, 2, 2), (16, 2500, 1, 1), (2, 3, 2, 3, 2), (32, 64, 2, 3, 2), (4, 6, 9, 9), (6, 10)]


@pytest.mark.parametrize("shape", SHAPES)
def test_per_unit_counts_for_every_spatial_size(shape: tuple[int, ...]) -> None:
    # small spatial sizes take a two-stage reduction (batch first); the counts must not depend on the path
    from hookscope.collectors.dead_relu import per_unit_sum
    from hookscope.sites import Site, default_unit_dim

    gen = torch.Generator().manual_seed(len(shape))
    x = (torch.rand(shape, generator=gen) < 0.3).float()
    site = Site(0, "s", "s", 0, hs.get_activation("relu"), None, None)
    site.bind_shape(shape, default_unit_dim(len(shape)))
    expected = [int(x.select(1, c).count_nonzero()) for c in range(shape[1])]  # element by element
    assert per_unit_sum(x, site).tolist() == expected

"""Per-layer parameter statistics against hand computations: norms of known weights and gradients, a known SGD
update, tied weights, frozen parameters, gradient accumulation and every=K."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hookscope as hs
from hookscope import HookManager
from hookscope.params import PARAM_COLUMNS

# every test runs on both paths: the native kernels and the ATen formulation
pytestmark = pytest.mark.usefixtures("each_path")


def two_layer() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))


def norm(*tensors: torch.Tensor) -> float:
    return math.sqrt(sum(float(t.detach().double().pow(2).sum()) for t in tensors))


def test_norms_and_a_known_sgd_update() -> None:
    model = two_layer()
    lr = 0.1
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    xs = [torch.randn(5, 3) for _ in range(3)]
    want = []
    previous: dict[str, list[torch.Tensor]] = {}
    with HookManager(model, params=True, alerts=False) as hm:
        for s, x in enumerate(xs):
            model(x).pow(2).mean().backward()
            hm.step()  # the parameters and gradients the optimizer is about to use
            for name in ("0", "2"):
                m = model[int(name)]
                theta = [m.weight.detach().clone(), m.bias.detach().clone()]
                ratio = (
                    math.nan
                    if s == 0
                    else norm(*(a - b for a, b in zip(theta, previous[name]))) / norm(*previous[name])
                )
                want.append(
                    [
                        s,
                        name,
                        "linear",
                        sum(t.numel() for t in theta),
                        norm(*theta),
                        norm(m.weight.grad, m.bias.grad),
                        ratio,
                    ]
                )
                previous[name] = theta
            opt.step()
            opt.zero_grad()
    got = hm.param_frame()
    assert list(got.columns) == list(PARAM_COLUMNS)
    assert got[["step", "module", "kind", "params"]].values.tolist() == [w[:4] for w in want]
    for g, w in zip(got[["weight_norm", "grad_norm", "update_ratio"]].to_numpy(), want):
        assert g.tolist() == pytest.approx(w[4:], rel=1e-6, nan_ok=True)
    # the SGD update is -lr * grad: the ratio at step 1 is lr * |g_0| / |theta_0|, from first principles
    step1 = got[(got["step"] == 1) & (got["module"] == "0")].iloc[0]
    step0 = got[(got["step"] == 0) & (got["module"] == "0")].iloc[0]
    assert step1["update_ratio"] == pytest.approx(lr * step0["grad_norm"] / step0["weight_norm"], rel=1e-5)


def test_tied_weights_count_once_and_frozen_parameters_have_no_gradient() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.tensor([2.0]))  # owned by the root itself
            self.embed = nn.Embedding(5, 3)
            self.head = nn.Linear(3, 5)
            self.head.weight = self.embed.weight  # tied: counts under `embed`, the first owner
            self.frozen = nn.Linear(3, 3)
            self.frozen.requires_grad_(False)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.frozen(self.embed(ids)) * self.scale)

    model = Tied()
    with HookManager(model, params=True, alerts=False) as hm:
        F.cross_entropy(model(torch.tensor([0, 1, 2])), torch.tensor([1, 2, 3])).backward()
        hm.step()
    frame = hm.param_frame().set_index("module")
    assert list(frame.index) == ["(root)", "embed", "head", "frozen"]
    assert frame.loc["embed", "params"] == 15 and frame.loc["head", "params"] == 5  # the bias only
    assert frame.loc["(root)", "kind"] == "tied" and frame.loc["embed", "kind"] == "embedding"
    assert frame.loc["head", "weight_norm"] == pytest.approx(norm(model.head.bias), rel=1e-6)
    assert frame.loc["embed", "grad_norm"] == pytest.approx(norm(model.embed.weight.grad), rel=1e-6)
    assert math.isnan(frame.loc["frozen", "grad_norm"])  # no parameter of it has a gradient
    assert frame.loc["frozen", "weight_norm"] == pytest.approx(norm(model.frozen.weight, model.frozen.bias))


def test_gradient_accumulation_and_every_k() -> None:
    model = two_layer()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    grads, thetas = {}, {}
    with HookManager(model, params=True, every=2, alerts=False) as hm:
        for s in range(4):
            for _ in range(2):  # two micro-batches: .grad holds their sum
                model(torch.randn(4, 3)).sum().backward()
            grads[s] = norm(model[0].weight.grad, model[0].bias.grad)
            thetas[s] = [model[0].weight.detach().clone(), model[0].bias.detach().clone()]
            hm.step()
            opt.step()
            opt.zero_grad()
    frame = hm.param_frame()
    first = frame[frame["module"] == "0"]
    assert first["step"].tolist() == [0, 2]  # recorded steps only
    assert first["grad_norm"].tolist() == pytest.approx([grads[0], grads[2]], rel=1e-6)
    delta = [a - b for a, b in zip(thetas[2], thetas[0])]
    assert first["update_ratio"].iloc[1] == pytest.approx(norm(*delta) / norm(*thetas[0]), rel=1e-5)


def test_without_updates_no_copy_is_kept_and_the_ratio_is_nan() -> None:
    model = two_layer()
    with HookManager(model, params=True, param_updates=False, alerts=False) as hm:
        for _ in range(2):
            model(torch.randn(2, 3)).sum().backward()
            hm.step()
    assert hm.param_frame()["update_ratio"].isna().all()
    assert hm.param_bytes() == 0
    with HookManager(two_layer(), params=True, alerts=False) as hm2:
        hm2.model(torch.randn(2, 3)).sum().backward()
        hm2.step()
    assert hm2.param_bytes() == sum(p.numel() * 4 for p in hm2.model.parameters())


def test_reports_csv_table_and_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = two_layer()
    with HookManager(model, params=True, alerts=False) as hm:
        model(torch.randn(2, 3)).sum().backward()
        hm.step()
    hm.param_to_csv(tmp_path / "params.csv")
    back = pd.read_csv(tmp_path / "params.csv", dtype={"module": str})
    pd.testing.assert_frame_equal(back, hm.param_frame(), check_dtype=False)
    text = str(hm.param_table(ascii=True))
    assert "weight norm" in text and "linear" in text and "step 0" in text
    with pytest.raises(RuntimeError, match="params=True"):
        HookManager(model).param_frame()
    with pytest.raises(TypeError, match="`params`"):
        HookManager(model, params="yes")  # type: ignore[arg-type]


def test_param_rules_on_hand_built_rows() -> None:
    rows = pd.DataFrame(
        {
            "module": ["a", "b", "c", "d", "e"],
            "grad_norm": [1.0, 2.0, 1e-6, 1.5, 0.0],
            "update_ratio": [1e-3, 0.5, 1e-3, 1e-8, 1e-9],
        }
    )
    # c: 6 orders below the median 1.5 (zeros are left out of the median); e: a zero gradient, as for layers
    assert [h[0] for h in hs.alerts.ParamGradientRule().check(rows)] == ["c", "e"]
    hits = hs.alerts.UpdateRatioRule().check(rows)
    assert [(h[0], h[2]) for h in hits] == [("b", 0.1), ("d", 1e-6)]  # e has no gradient: frozen, not flagged


def test_alerts_see_parameter_rows() -> None:
    model = two_layer()
    seen: list[hs.Alert] = []
    with HookManager(model, params=True, alerts=hs.Alerts(every=1, callback=seen.append, warn=False)) as hm:
        with torch.no_grad():
            model[2].weight.mul_(1e-7)  # the first layer's gradients vanish
        model(torch.randn(8, 3)).sum().backward()
        hm.step()
    assert ("param_gradient", "0") in [(a.rule, a.layer) for a in seen]


def test_parametrized_weights_belong_to_their_layer() -> None:
    from torch.nn.utils.parametrizations import weight_norm

    conv = weight_norm(nn.Conv1d(2, 3, 3))  # as wav2vec2's pos_conv_embed: original0/original1 hold the weight
    model = nn.Sequential(conv, nn.ReLU())
    with HookManager(model, params=True, alerts=False) as hm:
        model(torch.randn(2, 2, 8)).sum().backward()
        hm.step()
    frame = hm.param_frame()
    assert frame[["module", "kind", "params"]].values.tolist() == [["0", "conv1d", 3 + 3 + 18]]  # bias, g, v
    assert frame["weight_norm"].iloc[0] == pytest.approx(
        norm(conv.bias, conv.parametrizations.weight.original0, conv.parametrizations.weight.original1), rel=1e-6
    )


def test_float64_parameters_are_recorded() -> None:
    # torch._foreach_norm refuses to narrow float64 to float32: the ATen path takes float64 norms of them
    model = two_layer().double()
    with HookManager(model, params=True, alerts=False) as hm:
        model(torch.randn(5, 3, dtype=torch.float64)).pow(2).mean().backward()
        hm.step()
    frame = hm.param_frame()
    m = model[0]
    assert frame["weight_norm"].iloc[0] == pytest.approx(norm(m.weight, m.bias), rel=1e-12)
    assert frame["grad_norm"].iloc[0] == pytest.approx(norm(m.weight.grad, m.bias.grad), rel=1e-12)


def test_sparse_embedding_gradients_count_each_row_once() -> None:
    # Embedding(sparse=True) has a sparse COO gradient in which a row looked up twice appears twice
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.ReLU())
    with HookManager(model, params=True, alerts=False) as hm:
        model(torch.tensor([1, 2, 1])).sum().backward()
        hm.step()
    # d(sum of relu(W[i]))/dW[i] = 1 where W[i] > 0, per lookup: row 1 gets 2 where positive, row 2 gets 1
    w = model[0].weight.detach()
    want = math.sqrt(float(4 * (w[1] > 0).sum() + (w[2] > 0).sum()))
    assert hm.param_frame()["grad_norm"].iloc[0] == pytest.approx(want, rel=1e-6)
    assert hm.param_frame()["weight_norm"].iloc[0] == pytest.approx(norm(w), rel=1e-6)


def test_lazy_modules_are_recorded_once_they_have_run() -> None:
    # LazyLinear's parameters have no shape until the first forward: the manager can be built before it
    model = nn.Sequential(nn.LazyLinear(4), nn.ReLU())
    with HookManager(model, params=True, alerts=False) as hm:
        hm.step()  # nothing ran: nothing to measure
        model(torch.randn(2, 3)).sum().backward()
        hm.step()
    frame = hm.param_frame()
    m = model[0]
    assert frame["step"].tolist() == [1] and frame["params"].tolist() == [3 * 4 + 4]
    assert frame["weight_norm"].iloc[0] == pytest.approx(norm(m.weight, m.bias), rel=1e-6)
    assert frame["grad_norm"].iloc[0] == pytest.approx(norm(m.weight.grad, m.bias.grad), rel=1e-6)


def test_parameters_moved_after_the_manager_was_built_are_recorded_where_they_are() -> None:
    # deferred initialisation (torchtitan, FSDP2): the model is built on the meta device, the manager with it, and
    # the parameters get their storage afterwards (`to_empty`, as `model.to(device)` moves them in place); the
    # statistics follow the parameters to their new device (before: groups kept the construction-time device)
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    hm = HookManager(model, params=True, alerts=False)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    for m in (model[0], model[2]):
        nn.init.normal_(m.weight)
        nn.init.normal_(m.bias)
    lr = 0.1
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    with hm:
        model(torch.randn(5, 3)).pow(2).mean().backward()
        first = [norm(m.weight, m.bias) for m in (model[0], model[2])]
        grads = [norm(m.weight.grad, m.bias.grad) for m in (model[0], model[2])]
        hm.step()
        opt.step()
        opt.zero_grad()
        model(torch.randn(5, 3)).pow(2).mean().backward()
        hm.step()
    frame = hm.param_frame()
    assert frame["step"].tolist() == [0, 0, 1, 1]
    assert frame["weight_norm"].iloc[:2].tolist() == pytest.approx(first, rel=1e-6)
    assert frame["grad_norm"].iloc[:2].tolist() == pytest.approx(grads, rel=1e-6)
    # one SGD step: ‖Δθ‖ = lr ‖g‖ (without momentum), relative to the weights before it
    assert frame["update_ratio"].iloc[2:].tolist() == pytest.approx(
        [lr * g / w for g, w in zip(grads, first)], rel=1e-5
    )


def test_weights_untied_by_to_empty_are_each_recorded() -> None:
    # to_empty() gives every module a new parameter: a head tied to the embedding on the meta device owns its own
    # weight afterwards, and gets its row then (before: only the modules owning parameters alone when the manager
    # was built were read)
    with torch.device("meta"):
        emb, head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
        head.weight = emb.weight
        model = nn.Sequential(emb, nn.ReLU(), head)
    hm = HookManager(model, params=True, alerts=False)
    model.to_empty(device="cpu")
    assert model[2].weight is not model[0].weight  # torch's behaviour this test is about
    torch.manual_seed(0)
    nn.init.normal_(model[0].weight)
    nn.init.normal_(model[2].weight)
    with hm:
        model(torch.tensor([[1, 2, 3]])).sum().backward()
        hm.step()
    frame = hm.param_frame()
    assert frame["module"].tolist() == ["0", "2"] and frame["params"].tolist() == [40, 40]
    assert frame["weight_norm"].tolist() == pytest.approx([norm(model[0].weight), norm(model[2].weight)], rel=1e-6)
    assert frame["grad_norm"].tolist() == pytest.approx(
        [norm(model[0].weight.grad), norm(model[2].weight.grad)], rel=1e-6
    )


def test_a_parameter_replaced_between_records_is_followed() -> None:
    model = two_layer()
    lr = 0.1
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    want_norm: list[float] = []
    ratio_base: list[float] = []
    with HookManager(model, params=True, alerts=False) as hm:
        for step in range(3):
            if step == 1:  # a new parameter object (the optimizer is told too)
                model[2].bias = nn.Parameter(torch.full((1,), 3.0))
                opt = torch.optim.SGD(model.parameters(), lr=lr)
            model(torch.randn(5, 3)).pow(2).mean().backward()
            want_norm.append(norm(model[2].weight, model[2].bias))
            grads = [norm(m.weight.grad, m.bias.grad) for m in (model[0], model[2])]
            weights = [norm(m.weight, m.bias) for m in (model[0], model[2])]
            hm.step()
            if step == 1:
                ratio_base = [lr * g / w for g, w in zip(grads, weights)]
            opt.step()
            opt.zero_grad()
    frame = hm.param_frame()
    second = frame[frame["module"] == "2"]
    assert second["weight_norm"].tolist() == pytest.approx(want_norm, rel=1e-6)
    ratio = frame.pivot(index="step", columns="module", values="update_ratio")
    assert ratio.loc[0].isna().all()
    assert ratio.loc[1].isna().all()  # the parameters were grouped anew: the ratio starts again
    assert ratio.loc[2].tolist() == pytest.approx(ratio_base, rel=1e-5)

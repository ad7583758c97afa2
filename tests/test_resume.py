"""Long runs: state_dict / load_state_dict across processes, resumed sinks and trainers, spikes, the flight
recorder."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import hookscope as hs
from hookscope import Alerts, FlightRecorder, HookManager, SpikeRule
from hookscope.cli import main as cli_main
from hookscope.cli import read_stats
from hookscope.errors import HookscopeError, StateError

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import resume_worker as rw  # noqa: E402


def run_worker(mode: str, out: Path, state: Path, kernels: str) -> None:
    env = {**os.environ, "HOOKSCOPE_KERNELS": kernels, "PYTHONPATH": str(HERE.parent)}
    proc = subprocess.run(
        [sys.executable, str(HERE / "resume_worker.py"), mode, str(out), str(state)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]


def read(out: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(out / name, dtype={"layer": str, "module": str})


@pytest.mark.parametrize("kernels", ["native", "aten"])
def test_a_run_resumed_in_a_new_process_reports_what_the_uninterrupted_run_does(tmp_path: Path, kernels: str) -> None:
    from hookscope import kernels as k

    if kernels == "native" and not k.available():
        pytest.skip("native kernels unavailable")
    full, resumed, light = tmp_path / "full", tmp_path / "resumed", tmp_path / "light"
    for d in (full, resumed, light):
        d.mkdir()
    state = tmp_path / "state.pt"
    run_worker("full", full, state, kernels)
    run_worker("interrupted", resumed, state, kernels)
    interrupted_csv = read(resumed, "stats.csv")
    assert interrupted_csv["step"].max() >= rw.SAVE_AT + 1  # the preempted run wrote rows after its checkpoint
    (light / "stats.csv").write_bytes((resumed / "stats.csv").read_bytes())
    run_worker("resumed", resumed, state, kernels)
    run_worker("light", light, state, kernels)

    # the reference: the plan of which unit fires when (window 3), independent of hookscope
    timeline = read(resumed, "timeline.csv")
    assert timeline["last_fired"].fillna(-1).tolist() == [9, 2, 7, -1]
    assert timeline["dead"].tolist() == [False, True, False, True]
    assert timeline["dead_since"].fillna(-1).tolist() == [-1, 5, -1, 0]  # unit 1 last fired at 2: dead from 5
    assert timeline["revivals"].tolist() == [0, 0, 1, 0] and timeline["last_revival"].fillna(-1).tolist()[2] == 7
    frame = read(resumed, "frame.csv")
    relu = frame[frame["layer"] == "1"].set_index("step")
    # at the first resumed step 6, units 1, 2, 3 are silent over the window 4-6 and over their last 2 elements
    # (from scratch, confirmed_dead_ratio read 0 there: one silent element each); at 7 unit 2 fires again
    assert relu.loc[6, "dead_ratio"] == 0.75 and relu.loc[7, "dead_ratio"] == 0.5
    assert relu.loc[6, "confirmed_dead_ratio"] == 0.75 and relu.loc[7, "confirmed_dead_ratio"] == 0.5

    for name in ("frame.csv", "timeline.csv", "params.csv", "stats.csv"):
        pd.testing.assert_frame_equal(read(resumed, name), read(full, name), obj=name)
    csv = read(resumed, "stats.csv")
    assert not csv.duplicated(["step", "layer"]).any() and sorted(csv["step"].unique()) == list(range(rw.STEPS))
    assert cli_main(["show", str(resumed / "stats.csv")]) == 0
    result, reference = (json.loads((d / "result.json").read_text()) for d in (resumed, full))
    assert result["alerts"] == reference["alerts"] == [["dead_relu", "1", 2], ["spike", "loss", rw.SPIKE_AT]]
    assert result["delivered"] == [["spike", "loss", rw.SPIKE_AT]]  # the dead-unit alert is not delivered again
    assert result["dead"] == reference["dead"] == [1, 3]
    params = read(resumed, "params.csv")
    assert params[params["step"] == rw.SAVE_AT]["update_ratio"].notna().all()

    # without history and parameter copies: the rows from the resume on, and one NaN update_ratio
    frame_light, frame_full = read(light, "frame.csv"), read(full, "frame.csv")
    later = frame_full[frame_full["step"] >= rw.SAVE_AT].reset_index(drop=True)
    pd.testing.assert_frame_equal(frame_light, later)
    pd.testing.assert_frame_equal(read(light, "timeline.csv"), read(full, "timeline.csv"))
    p_light, p_full = read(light, "params.csv"), read(full, "params.csv")
    p_full = p_full[p_full["step"] >= rw.SAVE_AT].reset_index(drop=True)
    first = p_light["step"] == rw.SAVE_AT
    assert p_light[first]["update_ratio"].isna().all()
    pd.testing.assert_frame_equal(p_light[~first].reset_index(drop=True), p_full[~first].reset_index(drop=True))
    pd.testing.assert_frame_equal(read(light, "stats.csv"), read(full, "stats.csv"))


# ---------------------------------------------------------------------------------------------------------------
# the state itself


def _trained(steps: int = 4, **kwargs: Any) -> tuple[nn.Module, HookManager]:
    net = rw.model()
    hm = HookManager(net, alerts=False, params=True, **kwargs).attach()
    for t in range(steps):
        net(rw.inputs(t)).sum().backward()
        hm.step()
    return net, hm


def test_the_state_round_trips_through_torch_save_with_weights_only(tmp_path: Path) -> None:
    _, hm = _trained()
    torch.save(hm.state_dict(), tmp_path / "s.pt")
    loaded = torch.load(tmp_path / "s.pt", weights_only=True)
    fresh = HookManager(rw.model(), alerts=False, params=True)
    fresh.load_state_dict(loaded)
    assert fresh.current_step == 4 and fresh.layers == hm.layers
    pd.testing.assert_frame_equal(fresh.to_dataframe(), hm.to_dataframe())
    pd.testing.assert_frame_equal(fresh.unit_timeline(), hm.unit_timeline())


def _unchanged(hm: HookManager) -> None:
    assert hm.sites == [] and hm.current_step == 0 and len(hm.to_dataframe()) == 0


def _edits() -> list[tuple[str, Any, str]]:
    def drop(key: str) -> Any:
        return lambda sd: sd.pop(key)

    def unit_state(sd: dict[str, Any], value: Any) -> None:
        sd["sites"][0]["state"][0]["last_fired"] = value

    return [
        ("version", lambda sd: sd.update(version=99), "version 99"),
        ("truncated", drop("sites"), "'sites'"),
        ("shape", lambda sd: unit_state(sd, torch.zeros(5, dtype=torch.float64)), "shape [5]"),
        ("device", lambda sd: unit_state(sd, torch.zeros(4, dtype=torch.float64, device="meta")), "meta"),
        ("dtype", lambda sd: unit_state(sd, torch.zeros(4)), "torch.float32"),
        ("every", lambda sd: sd.update(every=2), "`every`=2"),
        (
            "another model",
            lambda sd: sd["sites"][0].update(module="encoder.relu", layer="encoder.relu"),
            "another model",
        ),
        ("not a dict", lambda sd: sd.update(sites=[1]), "sites[0]"),
    ]


@pytest.mark.parametrize("case", _edits(), ids=lambda c: c[0])
def test_a_bad_state_raises_naming_what_differs_and_loads_nothing(case: tuple[str, Any, str]) -> None:
    _, hm = _trained()
    good = hm.state_dict()
    bad = copy.deepcopy(good)
    case[1](bad)
    fresh = HookManager(rw.model(), alerts=False, params=True)
    with pytest.raises(StateError, match=case[2].replace("[", r"\[").replace("(", r"\(")):
        fresh.load_state_dict(bad)
    _unchanged(fresh)
    fresh.load_state_dict(good)  # the same manager still takes a good one
    assert fresh.current_step == 4


def test_other_collectors_and_a_manager_that_recorded_are_refused() -> None:
    _, hm = _trained()
    sd = hm.state_dict()
    other = HookManager(rw.model(), [hs.DeadReLU(window=5)], alerts=False, params=True)
    with pytest.raises(StateError, match=r"other collectors.*DeadReLU\(.*window=1.*window=5"):
        other.load_state_dict(sd)
    _unchanged(other)
    _, busy = _trained(steps=1)
    with pytest.raises(StateError, match="recorded nothing yet"):
        busy.load_state_dict(sd)
    assert busy.current_step == 1 and len(busy.to_dataframe()) == 2
    with pytest.raises(HookscopeError):
        HookManager(rw.model()).load_state_dict("not a state")  # type: ignore[arg-type]


def test_strict_false_loads_the_matching_sites_and_warns_once_naming_the_others() -> None:
    _, hm = _trained()
    sd = hm.state_dict()
    extra = copy.deepcopy(sd["sites"][0])
    extra.update(layer="gone.relu", module="gone", key=["gone", 0])
    sd["sites"].append(extra)
    with pytest.raises(StateError, match=r"'gone\.relu'"):
        HookManager(rw.model(), alerts=False, params=True).load_state_dict(sd)
    fresh = HookManager(rw.model(), alerts=False, params=True)
    with pytest.warns(hs.HookscopeWarning, match="gone.relu"):
        fresh.load_state_dict(sd, strict=False)
    assert fresh.layers == ["1", "3"]
    pd.testing.assert_frame_equal(fresh.unit_timeline(), hm.unit_timeline())


def test_evaluation_after_a_resume_stays_out_of_the_statistics_as_before_it() -> None:
    net, hm = _trained()
    sd = hm.state_dict()
    fresh = HookManager(net, alerts=False, params=True)
    fresh.load_state_dict(sd)
    with fresh, torch.no_grad():
        net(rw.inputs(0))  # an evaluation pass at the resume: the saved run had trained, so it is not recorded
        fresh.step()
    assert fresh.to_dataframe()["step"].max() == 3


def test_a_model_with_an_activation_module_the_state_does_not_hold_is_refused_unless_not_strict() -> None:
    _, hm = _trained()
    sd = hm.state_dict()
    bigger = nn.Sequential(*rw.model(), nn.ReLU())  # a fifth module, "4", a site the saved run never had
    with pytest.raises(StateError, match=r"activation modules that the saved state does not hold: '4'"):
        HookManager(bigger, alerts=False).load_state_dict(sd)
    fresh = HookManager(bigger, alerts=False)
    with pytest.warns(hs.HookscopeWarning, match="'4' are not in the saved state"):
        fresh.load_state_dict(sd, strict=False)
    with fresh:
        bigger(rw.inputs(4)).sum().backward()
        fresh.step()
    assert fresh.layers == ["1", "3", "4"]  # the new site starts fresh when it is discovered
    assert fresh.to_dataframe().groupby("step").size().tolist() == [2, 2, 2, 2, 3]


def test_state_size_is_reported_by_its_tensors() -> None:
    from hookscope.state import state_bytes

    _, hm = _trained()
    full, light = hm.state_dict(), hm.state_dict(history=False, param_copies=False)
    copies = sum(p.numel() * 4 for p in rw.model().parameters() if p.requires_grad)
    assert state_bytes(full) - state_bytes(light) >= copies  # the copies of the trained layer, and the history


# ---------------------------------------------------------------------------------------------------------------
# the CSV sink of a resumed run (the README's recipe)


def test_a_sink_resumed_with_start_step_drops_the_rows_written_after_the_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "stats.csv"
    net = rw.model()
    with HookManager(net, sinks=[hs.CSVSink(path, every=1)], alerts=False) as hm:
        for t in range(9):  # the run wrote up to step 8; its checkpoint was taken at step 6
            net(rw.inputs(t)).sum().backward()
            hm.step()
    written = path.read_text().splitlines()
    with HookManager(net, sinks=[hs.CSVSink(path, every=1)], alerts=False, start_step=6) as hm2:
        for t in range(6, 10):
            net(rw.inputs(t)).sum().backward()
            hm2.step()
    lines = path.read_text().splitlines()
    assert lines[: 1 + 2 * 6] == written[: 1 + 2 * 6]  # header and steps 0-5 untouched
    steps = pd.read_csv(path)["step"].tolist()
    assert steps == [s for s in range(10) for _ in range(2)]
    assert cli_main(["show", str(path)]) == 0


# ---------------------------------------------------------------------------------------------------------------
# under 2 gloo ranks


def _dist_worker(rank: int, init_file: str, out: str, mode: str) -> None:
    os.environ["HOOKSCOPE_KERNELS"] = "aten" if rank else os.environ.get("HOOKSCOPE_KERNELS", "")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        warnings.simplefilter("ignore")
        net = rw.model()
        hm = HookManager(net, [hs.DeadReLU(window=3, evidence=2)], alerts=False)
        start = 0
        if mode == "resumed":
            hm.load_state_dict(torch.load(Path(out) / "state0.pt", weights_only=True))
            start = rw.SAVE_AT
        hm.attach()
        for t in range(start, rw.STEPS):
            x = rw.inputs(t) if rank == 0 else -rw.inputs(t)  # rank 1 fires where rank 0 does not
            net(x).sum().backward()
            hm.step()
            if mode == "interrupted" and t == rw.SAVE_AT - 1:
                torch.save(hm.state_dict(), Path(out) / f"state{rank}.pt")
                break
        if mode != "interrupted":
            hm.detach()
            if rank == 0:
                hm.to_dataframe().to_csv(Path(out) / f"{mode}.csv", index=False)
                hm.unit_timeline().to_csv(Path(out) / f"{mode}-timeline.csv", index=False)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_under_two_gloo_ranks_every_rank_saves_the_global_state_and_a_resumed_run_matches(tmp_path: Path) -> None:
    for mode in ("full", "interrupted", "resumed"):
        init = tempfile.mktemp(dir=tmp_path)
        mp.spawn(_dist_worker, args=(init, str(tmp_path), mode), nprocs=2, join=True)
        if mode == "interrupted":
            s0, s1 = (torch.load(tmp_path / f"state{r}.pt", weights_only=True) for r in (0, 1))
            for a, b in zip(s0["sites"], s1["sites"]):
                for x, y in zip(a["state"], b["state"]):
                    assert x is None or all(torch.equal(x[k], y[k]) for k in x)
    for name in ("{}.csv", "{}-timeline.csv"):
        pd.testing.assert_frame_equal(
            pd.read_csv(tmp_path / name.format("resumed"), dtype={"layer": str}),
            pd.read_csv(tmp_path / name.format("full"), dtype={"layer": str}),
        )
    timeline = pd.read_csv(tmp_path / "full-timeline.csv")
    assert not timeline["dead"].any()  # globally every unit fires at each step (on one rank or the other)


# ---------------------------------------------------------------------------------------------------------------
# spikes


def _series(n: int) -> list[float]:
    return [2.0 + 0.1 * math.sin(t / 3.0) for t in range(n)]


def test_a_smooth_series_never_fires_and_planted_spikes_fire_once_at_their_step() -> None:
    rule = SpikeRule("loss", sigma=6.0, window=16)
    assert rule.observe(range(400), _series(400)) == []
    values = _series(200)
    values[50] = 3.0  # the window's std is about 0.07: far above mean + 6 std
    values[120] = 2.5
    hits = SpikeRule("loss", sigma=6.0, window=16).observe(range(200), values)
    assert [h[0] for h in hits] == [50, 120]
    values = _series(40)
    values[3] = float("nan")  # non-finite: at once, without a full window, and out of the window
    assert [(h[0], h[1]) for h in SpikeRule("loss", window=16).observe(range(40), values)] == [(3, "loss")]


def test_spike_alerts_name_the_spiking_step_when_the_check_comes_later() -> None:
    net = rw.model()
    seen: list[hs.Alert] = []
    alerts = Alerts([SpikeRule("loss", window=8)], every=10, callback=seen.append, warn=False, log=False)
    values = _series(40)
    values[23] = 9.0
    with HookManager(net, alerts=alerts) as hm:
        for t in range(40):
            net(rw.inputs(t % 3)).sum().backward()
            hm.step(loss=torch.tensor(values[t]))
    assert [(a.rule, a.step) for a in seen] == [("spike", 23)]


def test_grad_norm_and_column_spikes(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(hs.ConfigError, match="params=True"):
        HookManager(rw.model(), alerts=Alerts([SpikeRule("grad_norm")]))
    with pytest.raises(hs.ConfigError, match="stat must be"):
        HookManager(rw.model(), alerts=Alerts([SpikeRule("no_such_column")]))
    net = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 1))
    seen: list[hs.Alert] = []
    rules = [SpikeRule("grad_norm", window=8), SpikeRule("grad_norm_max", window=8)]
    rules[1].stat, rules[1].name = "grad_norm", "spike"  # the activation column cannot be named "grad_norm"
    alerts = Alerts([rules[0]], every=5, callback=seen.append, warn=False, log=False)
    with HookManager(net, params=True, alerts=alerts) as hm:
        for t in range(30):
            scale = 1000.0 if t == 17 else 1.0
            (net(torch.ones(2, 3)).sum() * scale).backward()
            hm.step()
            net.zero_grad()
    assert [(a.rule, a.layer, a.step) for a in seen] == [("spike", "grad_norm", 17)]
    seen.clear()
    alerts = Alerts([SpikeRule("inactive_fraction", window=8, aggregate="mean")], every=5, callback=seen.append,
                    warn=False, log=False)  # fmt: skip
    net2 = rw.model()
    with HookManager(net2, alerts=alerts) as hm:
        for t in range(30):
            x = rw.inputs(0) if t != 21 else -torch.ones(1, 4, requires_grad=True)  # all units silent at step 21 only
            net2(x).sum().backward()
            hm.step()
    assert [(a.layer, a.step) for a in seen] == [("inactive_fraction", 21)]


# ---------------------------------------------------------------------------------------------------------------
# the flight recorder


def test_a_planted_nan_leaves_a_flight_file_that_show_and_plot_read(tmp_path: Path) -> None:
    net = rw.model()
    alerts = Alerts([SpikeRule("loss", window=8)], every=4, warn=False, log=False)
    recorder = FlightRecorder(tmp_path / "flight", steps=5)
    values = _series(30)
    values[13] = float("nan")
    values[15] = float("nan")  # within `steps` of the first: no second dump
    with HookManager(net, alerts=alerts, sinks=[recorder]) as hm:
        for t in range(30):
            net(rw.inputs(t % 3)).sum().backward()
            hm.step(loss=torch.tensor(values[t]))
    assert sorted(os.listdir(tmp_path / "flight")) == ["flight-13.csv"]
    path = tmp_path / "flight" / "flight-13.csv"
    text = path.read_text()
    assert text.startswith("# hookscope flight recorder: hookscope: step 13: loss is nan")
    frame = read_stats(str(path))
    assert set(range(9, 14)) <= set(frame["step"]) and list(frame.columns) == list(hm.columns)
    assert cli_main(["show", str(path), "--ascii"]) == 0
    assert cli_main(["plot", str(path), "-o", str(tmp_path / "p.png")]) == 0


def test_a_full_disk_warns_once_and_never_stops_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hookscope.reporters.flight as flight

    def full(path: Any, text: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(flight, "atomic_write_text", full)
    net = rw.model()
    values = _series(80)
    values[20] = values[60] = float("inf")
    alerts = Alerts([SpikeRule("loss", window=8), SpikeRule("loss", window=4)], every=4, warn=False, log=False)
    with (
        pytest.warns(hs.HookscopeWarning, match="No space left") as caught,
        HookManager(net, alerts=alerts, sinks=[FlightRecorder(tmp_path, steps=5)]) as hm,
    ):
        for t in range(80):
            net(rw.inputs(t % 3)).sum().backward()
            hm.step(loss=values[t])
    assert hm.current_step == 80 and sum("No space" in str(w.message) for w in caught) == 1


# ---------------------------------------------------------------------------------------------------------------
# trainers


def _lightning_fit(tmp_path: Path, csv: Path, ckpt_path: str | None, **kwargs: Any) -> HookManager:
    L = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.callbacks import ModelCheckpoint

    from hookscope.integrations.lightning import HookscopeCallback

    class Module(L.LightningModule):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.net = rw.model()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.net(batch[0]).pow(2).mean()

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)

    data = torch.utils.data.TensorDataset(torch.cat([rw.inputs(t) for t in range(4)]))
    loader = torch.utils.data.DataLoader(data, batch_size=1)  # 4 steps per epoch, the plan's first 4 inputs
    callback = HookscopeCallback(alerts=False, sinks=[hs.CSVSink(csv, every=1)], collectors=[hs.DeadReLU(window=3)])
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1)
    trainer = L.Trainer(
        callbacks=[callback, checkpoint], logger=False, enable_progress_bar=False, enable_model_summary=False,
        accelerator="cpu", **kwargs,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Module(), loader, ckpt_path=ckpt_path)
    assert callback.manager is not None
    return callback.manager


def test_lightning_fit_with_ckpt_path_continues_numbering_state_and_csv(tmp_path: Path) -> None:
    full = _lightning_fit(tmp_path / "a", tmp_path / "full.csv", None, max_epochs=2)
    # the interrupted run: a checkpoint at the end of epoch 0 (global step 4), then steps 4 and 5 written
    _lightning_fit(tmp_path / "b", tmp_path / "resumed.csv", None, max_steps=6)
    ckpt = next((tmp_path / "b" / "ckpt").glob("epoch=0*.ckpt"))
    resumed = _lightning_fit(tmp_path / "b", tmp_path / "resumed.csv", str(ckpt), max_epochs=2)
    frame = resumed.to_dataframe()
    assert sorted(frame["step"].unique()) == list(range(8))  # numbered from the checkpoint's step 4 on, after 0-3
    pd.testing.assert_frame_equal(frame, full.to_dataframe())
    pd.testing.assert_frame_equal(resumed.unit_timeline(), full.unit_timeline())
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "resumed.csv"), pd.read_csv(tmp_path / "full.csv"))
    # the plan's inputs 0-3 in each epoch: unit 1 fires at 0-2 and 4-6 (last at 6), unit 3 never
    assert resumed.unit_timeline()["last_fired"].fillna(-1).tolist() == [7, 6, 5, -1]


def test_hf_trainer_resume_from_checkpoint_restores_hookscope_state(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import test_transformers as tt

    from hookscope.integrations.transformers import STATE_FILE, HookscopeTrainerCallback

    def train(out: Path, csv: Path, resume: str | None, **overrides: Any) -> HookManager:
        torch.manual_seed(0)
        callback = HookscopeTrainerCallback(alerts=False, sinks=[hs.CSVSink(csv, every=1)])
        options = {
            "save_strategy": "steps",
            "save_steps": 2,
            "eval_strategy": "no",
            "eval_on_start": False,
            "lr_scheduler_type": "constant",
        }  # the interrupted run (max_steps=3) decays no differently
        trainer = tt.make_trainer(out, tt.tiny_bert(), [callback], **{**options, **overrides})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.train(resume_from_checkpoint=resume)
        assert callback.manager is not None
        return callback.manager

    full = train(tmp_path / "a", tmp_path / "full.csv", None)
    train(tmp_path / "b", tmp_path / "resumed.csv", None, max_steps=3)  # wrote step 2 after checkpoint-2
    assert (tmp_path / "b" / "checkpoint-2" / STATE_FILE).exists()
    resumed = train(tmp_path / "b", tmp_path / "resumed.csv", str(tmp_path / "b" / "checkpoint-2"))
    frame, reference = resumed.to_dataframe(), full.to_dataframe()
    assert sorted(frame["step"].unique()) == list(range(tt.MAX_STEPS))
    pd.testing.assert_frame_equal(frame, reference, check_exact=False, rtol=1e-6)
    written = pd.read_csv(tmp_path / "resumed.csv")
    assert not written.duplicated(["step", "layer"]).any()
    pd.testing.assert_frame_equal(written, pd.read_csv(tmp_path / "full.csv"), check_exact=False, rtol=1e-6)

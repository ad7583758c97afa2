"""Evaluation inside a training loop never mixes into the training statistics; a model that never trains is
observed as before."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import ActivationCalls, definition_rows

import hookscope.warn
from hookscope import HookManager
from hookscope.warn import HookscopeWarning

pytestmark = pytest.mark.usefixtures("each_path")

STATS = ["dead_ratio", "inactive_fraction", "saturation_rate", "grad_norm"]


def planted() -> nn.Sequential:
    """One input, two ReLU units: unit 0 fires for x > 0, unit 1 for x < 0. Training sees x > 0 only, so unit 1
    is dead in training (dead_ratio 0.5); one evaluation batch of x < 0 would make it fire (dead_ratio 0.0)."""
    model = nn.Sequential(nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0], [-1.0]]))
        model[0].bias.zero_()
    return model


def _train_forward(model: nn.Module) -> None:
    model(torch.rand(4, 1) + 0.5).sum().backward()


def _evaluate(model: nn.Module, how: str) -> None:
    x = -(torch.rand(4, 1) + 0.5)
    if how == "no_grad":
        with torch.no_grad():
            model(x)
    elif how == "inference_mode":
        with torch.inference_mode():
            model(x)
    elif how == "eval_mode":  # gradients on, the model in eval mode (its dropout and batch norm for evaluation)
        model.eval()
        model(x)
        model.train()
    else:  # nanoGPT's estimate_loss(): both
        model.eval()
        with torch.no_grad():
            model(x)
        model.train()


@pytest.mark.parametrize("how", ["no_grad", "inference_mode", "eval_mode", "eval_no_grad"])
def test_an_evaluation_pass_in_a_training_step_is_not_merged(how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hookscope.warn, "_seen", set())  # said once per process: maybe by an earlier test
    model = planted()
    with HookManager(model) as hm, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _evaluate(model, how)  # before the first training pass of the first step (nanoGPT's iteration 0)
        _train_forward(model)
        hm.step()
        _train_forward(model)
        _evaluate(model, how)  # after it
        hm.step()
        _evaluate(model, how)  # at the top of an iteration
        _train_forward(model)
        hm.step()
    df = hm.to_dataframe()
    assert list(df["step"]) == [0, 1, 2]
    assert list(df["calls"]) == [1, 1, 1]  # the training pass alone
    assert list(df["dead_ratio"]) == [0.5, 0.5, 0.5]  # unit 1 never fired in training
    assert list(df["inactive_fraction"]) == [0.5, 0.5, 0.5]
    assert hm.dead_units("1") == [1]
    said = [w for w in caught if issubclass(w.category, HookscopeWarning)]
    assert len(said) == 1, [str(w.message) for w in said]  # one message, the first time
    assert "evaluation passes are not recorded" in str(said[0].message)
    assert said[0].filename == __file__  # it points at the user's call of the model


def test_a_model_that_never_trains_is_observed_as_before() -> None:
    model = planted()
    with warnings.catch_warnings():
        warnings.simplefilter("error", HookscopeWarning)  # nothing to say
        with HookManager(model) as hm:
            for how in ("no_grad", "inference_mode", "eval_no_grad"):
                _evaluate(model, how)
                _evaluate(model, how)
                hm.step()
            model.eval()
            with torch.no_grad():
                model(torch.rand(4, 1) + 0.5)  # no step(): the open step is reported
            frame = hm.to_dataframe()
    assert list(frame["step"]) == [0, 1, 2, 3]
    assert list(frame["calls"]) == [2, 2, 2, 1]
    # evaluation data x < 0: unit 0 never fires, unit 1 always; then x > 0: the reverse
    assert list(frame["dead_ratio"]) == [0.5, 0.5, 0.5, 0.5]
    assert hm.dead_units("1") == [1]


# ----------------------------------------------------------------------------------------------------------------
# nanoGPT's loop shape: evaluation (model.eval(), no_grad) every few iterations inside the training loop


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.c_fc, self.gelu, self.mlp_proj = nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)
        self.n_head = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.c_proj(y)
        return x + self.mlp_proj(self.gelu(self.c_fc(self.ln_2(x))))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int = 32, d: int = 16, block_size: int = 8) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block_size, d)
        self.h = nn.ModuleList(Block(d) for _ in range(2))
        self.ln_f, self.lm_head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)
        with torch.no_grad():
            self.h[0].c_fc.bias[:5] = -50.0  # five planted dead units (GELU is never positive there)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


class CompiledGPT(TinyGPT):
    """A class of its own for the compiled copy (dynamo shares compiled code between instances of one class)."""


def nanogpt_loop(model: nn.Module, run: nn.Module, iters: int, manager: HookManager | None = None) -> list[float]:
    """nanoGPT's train.py, shrunk: estimate_loss() every 2 iterations (eval mode, no_grad, train and val splits),
    2 micro-steps of gradient accumulation, AdamW. ``run`` is the model or its compiled version; with a
    reference :class:`ActivationCalls` as ``manager`` it is active around the training forwards only."""
    gen = torch.Generator().manual_seed(3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def get_batch(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        hi = 16 if split == "train" else 32  # the validation split uses other tokens: other activations
        x = torch.randint(0, hi, (4, 8), generator=gen)
        return x, torch.roll(x, -1, dims=1)

    @torch.no_grad()
    def estimate_loss() -> dict[str, float]:
        model.eval()
        out = {split: float(sum(run(*get_batch(split))[1] for _ in range(2)) / 2) for split in ("train", "val")}
        model.train()
        return out

    losses = []
    for iter_num in range(iters):
        if iter_num % 2 == 0:
            estimate_loss()
        for _ in range(2):
            if isinstance(manager, ActivationCalls):
                with manager:
                    _, loss = run(*get_batch("train"))
            else:
                _, loss = run(*get_batch("train"))
            (loss / 2).backward()
        if isinstance(manager, HookManager):
            manager.step()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


BACKENDS = [None, "aot_eager"] + (["inductor"] if shutil.which("g++") or shutil.which("c++") else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_nanogpt_loop_records_the_training_passes_only(backend: str | None) -> None:
    torch.manual_seed(0)
    model = CompiledGPT() if backend else TinyGPT()
    reference = TinyGPT()
    reference.load_state_dict(model.state_dict())
    seen = ActivationCalls()
    want_losses = nanogpt_loop(reference, reference, 4, seen)
    want = definition_rows(seen.calls, per_forward=2, forwards=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HookscopeWarning)
        with HookManager(model, alerts=False) as hm:
            run = torch.compile(model, backend=backend) if backend else model
            losses = nanogpt_loop(model, run, 4, hm)
    df = hm.to_dataframe()
    assert losses == pytest.approx(want_losses, rel=1e-5)  # training unchanged
    assert list(df["step"]) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert list(df["layer"]) == ["h.0.gelu", "h.1.gelu"] * 4
    assert list(df["calls"]) == [r["calls"] for r in want] == [2] * 8  # the two micro-steps, no evaluation pass
    for stat in STATS:  # float32 sums of squares for grad_norm (the reference sums in float64)
        assert df[stat].tolist() == pytest.approx([r[stat] for r in want], rel=1e-6, abs=1e-12, nan_ok=True), stat
    assert set(hm.dead_units("h.0.gelu")) >= {0, 1, 2, 3, 4}

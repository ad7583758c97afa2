"""Module sites and the Magnitude / Entropy collectors on real architectures: Hugging Face GPT-2 and Llama built
from configs (offline; decoder layers selected by class and by pattern, tuple outputs), nanoGPT-style blocks, timm
ViT blocks. Expected values come from this file's plain forward hooks and numpy (``test_magnitude.reference``), and
training stays bit-for-bit that of an uninstrumented copy."""

from __future__ import annotations

import copy
import math
import os
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_magnitude import reference

import hookscope as hs
from hookscope import HookManager

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

pytestmark = pytest.mark.usefixtures("each_path")

COLUMNS = ("rms", "mean", "std", "abs_max", "kurtosis", "zero_fraction", "massive_units", "dormant_ratio",
           "neuron_kurtosis")  # fmt: skip


class Capture:
    """Plain forward hooks on named modules: a float64 copy of each output's first floating tensor, per step."""

    def __init__(self, named: dict[str, nn.Module]) -> None:
        self.outputs: dict[str, list[np.ndarray]] = {}
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in named.items()]

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if not isinstance(out, torch.Tensor):
                out = next(t for t in out if isinstance(t, torch.Tensor) and t.is_floating_point())
            self.outputs.setdefault(name, []).append(out.detach().double().numpy().copy())

        return hook

    def take(self) -> dict[str, list[np.ndarray]]:
        out, self.outputs = self.outputs, {}
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def train(
    model: nn.Module, batches: list[Any], loss_fn: Any, names: list[str], **manager: Any
) -> tuple[HookManager, list[dict[str, dict[str, Any]]]]:
    """SGD steps with hookscope attached, and a plain copy trained alike: parameters must end bit-for-bit equal.
    Returns the manager and, per step, the reference values of each named module."""
    plain = copy.deepcopy(model)
    modules = dict(model.named_modules())
    capture = Capture({n: modules[n] for n in names})
    expected: list[dict[str, dict[str, Any]]] = []
    for net, instrumented in ((model, True), (plain, False)):
        torch.manual_seed(0)
        opt = torch.optim.SGD(net.parameters(), lr=0.05)
        hm = HookManager(net, alerts=False, **manager) if instrumented else None
        if hm is not None:
            hm.attach()
        for batch in batches:
            opt.zero_grad()
            loss_fn(net, batch).backward()
            if hm is not None:
                hm.step()
                expected.append({n: reference(o) for n, o in capture.take().items()})
            opt.step()
        if hm is not None:
            hm.detach()
            capture.remove()
            manager_out = hm
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert torch.equal(p, q), f"training changed: {name}"
    return manager_out, expected


def check(hm: HookManager, expected: list[dict[str, dict[str, Any]]], rtol: float = 2e-5) -> None:
    frame = hm.to_dataframe()
    for step, per_layer in enumerate(expected):
        for layer, want in per_layer.items():
            row = frame[(frame["step"] == step) & (frame["layer"] == layer)]
            assert len(row) == 1, (step, layer, list(frame["layer"]))
            assert row["kind"].iloc[0] == "output"
            for col in COLUMNS:
                got = float(row[col].iloc[0])
                if col in ("massive_units", "dormant_ratio"):
                    assert got == want[col], (step, layer, col)
                else:
                    assert got == pytest.approx(want[col], rel=rtol, abs=1e-12), (step, layer, col, got, want[col])


def lm_loss(net: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return net(input_ids=ids, labels=ids).loss  # type: ignore[no-any-return]


def token_batches(n: int = 2, vocab: int = 64) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (2, 12), generator=gen) for _ in range(n)]


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face


def test_hugging_face_gpt2_decoder_layers_massive_unit_and_per_head_entropy() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4,
                                     attn_implementation="eager")  # fmt: skip
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        model.transformer.h[1].mlp.c_proj.bias[7] = 5000.0  # a planted massive unit in block 1's output
    names = ["transformer.h.0", "transformer.h.1"]
    hm, expected = train(model, token_batches(), lm_loss, names, modules=type(model.transformer.h[0]),
                         collectors=[hs.Magnitude(), hs.Entropy(), hs.GradientNorm()])  # fmt: skip
    check(hm, expected)
    assert hm.massive_units("transformer.h.1") == [7] == expected[-1]["transformer.h.1"]["massive"]
    assert hm.massive_units("transformer.h.0") == []
    # per-head entropy: the attention probabilities the model itself returns, after training
    ids = token_batches(1)[0]
    model.eval()  # no dropout on the probabilities
    frame_entropy = {}
    with HookManager(model, [hs.Entropy()], alerts=False) as probe, torch.no_grad():
        attentions = model(input_ids=ids, output_attentions=True).attentions
        softmax_sites = [s.layer for s in probe.sites if s.kind == "softmax"]
        for layer in softmax_sites:
            frame_entropy[layer] = probe.unit_frame(layer, "entropy")
    assert len(softmax_sites) == 2 and all(".attn." in s for s in softmax_sites)
    for probs, layer in zip(attentions, softmax_sites):
        p = probs.double().numpy()  # (B, H, T, T)
        with np.errstate(divide="ignore", invalid="ignore"):
            rows = np.where(p > 0, -p * np.log(p), 0.0).sum(-1)
        np.testing.assert_allclose(frame_entropy[layer]["entropy"], rows.mean(axis=(0, 2)), rtol=1e-5)
        assert len(frame_entropy[layer]) == 4  # one row per head


def test_hugging_face_llama_decoder_layers_by_class_and_by_pattern() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    names = ["model.layers.0", "model.layers.1"]
    hm, expected = train(model, token_batches(), lm_loss, names, modules=type(model.model.layers[0]))
    check(hm, expected)
    assert {"model.layers.0", "model.layers.1"} <= set(hm.layers)
    by_pattern, again = train(transformers.LlamaForCausalLM(config), token_batches(), lm_loss, names,
                              modules="model.layers.?")  # fmt: skip
    assert [s.layer for s in by_pattern.sites if s.kind == "output"] == names
    check(by_pattern, again)


# ---------------------------------------------------------------------------------------------------------------
# nanoGPT-style blocks


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.last: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)
        mask = torch.ones(t, t, dtype=torch.bool).tril()
        att = att.masked_fill(~mask, float("-inf"))
        att = F.softmax(att, dim=-1)
        self.last = att.detach().double()
        return self.c_proj((att @ v).transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, vocab: int = 64, d: int = 32, layers: int = 3) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.h = nn.ModuleList([Block(d) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.wte(ids)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # type: ignore[no-any-return]


def test_nanogpt_blocks_and_their_attention_heads() -> None:
    model = NanoGPT()

    def loss(net: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(net(ids).flatten(0, 1), ids.flatten())

    names = [f"h.{i}" for i in range(3)]
    hm, expected = train(model, token_batches(), loss, names, modules=Block,
                         collectors=[hs.Magnitude(), hs.Entropy(), hs.GradientNorm()])  # fmt: skip
    check(hm, expected)
    assert hm.site("h.0").units == 32
    frame = hm.to_dataframe()
    assert frame[frame["kind"] == "output"]["grad_norm"].notna().all()  # residual-stream gradient norms
    # the last step's per-head entropy, against the probabilities the attention kept (its last forward)
    for i in range(3):
        p = model.h[i].attn.last.numpy()
        with np.errstate(divide="ignore", invalid="ignore"):
            rows = np.where(p > 0, -p * np.log(p), 0.0).sum(-1)  # causal rows: ln(1), ..., up to ln(12)
        units = hm.unit_frame(f"h.{i}.attn.softmax()", "entropy")
        np.testing.assert_allclose(units["entropy"], rows.mean(axis=(0, 2)), rtol=1e-5)
        last = frame[(frame["layer"] == f"h.{i}.attn.softmax()") & (frame["step"] == 1)]
        assert float(last["entropy"].iloc[0]) == pytest.approx(rows.mean(), rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# timm


def test_timm_vit_blocks() -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32)
    block = type(model.blocks[0])
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(2, 3, 32, 32, generator=gen), torch.randint(0, 10, (2,), generator=gen)) for _ in "ab"]

    def loss(net: nn.Module, batch: Any) -> torch.Tensor:
        return F.cross_entropy(net(batch[0]), batch[1])

    names = [f"blocks.{i}" for i in range(len(model.blocks))]
    hm, expected = train(model, batches, loss, names, modules=block)
    check(hm, expected, rtol=5e-5)
    assert hm.site("blocks.0").units == model.embed_dim  # (B, tokens, C): the channels are the units

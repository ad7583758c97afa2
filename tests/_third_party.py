"""Third-party architectures under hookscope, checked against an independent reference.

Each :class:`Case` builds a tiny model nobody on the team wrote (torchvision, timm, Hugging Face from configs,
torch's own RNN / transformer layers, a small GAN) and a training step on synthetic data. :func:`run_case` trains
three copies of it with identical weights, seeds and data for a few SGD steps:

- ``inst``: ``HookManager(model, params=True)`` attached before training, ``hm.step()`` after each step;
- ``plain``: nothing attached (training must end bit-for-bit equal to ``inst``: parameters and buffers);
- ``ref``: this file's own hooks (:class:`Reference`): a forward pre-/post-hook on every module for the module
  stack, a forward hook on each activation module (matched by this file's own list of class names), a
  ``TorchFunctionMode`` for functional calls (matched by function *name*, skipping calls made inside an
  activation module), and ``Tensor.register_hook`` on each output for its gradient. Per site and step it keeps
  the output elements, the elements ``<= 0``, the units with no positive element (along the unit dimension a
  reader of the model would choose: :attr:`Case.expect_dim`), saturated elements, and the float64 sum of
  squared gradients.

Nothing here reads hookscope's registry, its unit inference or its names: expected values come from the model
and from first principles. The fast subset runs in ``tests/test_third_party.py``; the whole sweep with
``python tests/_third_party.py [names...]`` prints one table row per model (see ``--help``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fnmatch
import functools
import io
import math
import os
import random
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# ------------------------------------------------------------------------------------------------------------------
# The reference: what counts as an activation, decided here and not by hookscope

#: Activation module classes, by class name anywhere in the class hierarchy (torch, Hugging Face, timm).
ACT_CLASS_NAMES = frozenset(
    {
        "ReLU", "ReLU6", "LeakyReLU", "PReLU", "RReLU", "ELU", "SELU", "CELU", "GELU", "SiLU", "Mish",
        "Hardswish", "Hardsigmoid", "Hardtanh", "Sigmoid", "Tanh", "Softplus", "Softsign", "Softmax", "Softmin",
        "LogSoftmax", "LogSigmoid",
        # Hugging Face
        "GELUActivation", "NewGELUActivation", "FastGELUActivation", "QuickGELUActivation",
        "ClippedGELUActivation", "AccurateGELUActivation", "GELUTanh", "SiLUActivation", "MishActivation",
        # timm
        "Swish", "QuickGELU", "HardSwish", "HardSigmoid",
    }
)  # fmt: skip
#: Functional activations, by the function's ``__name__`` (``F.relu``, ``torch.relu``, ``Tensor.relu_``...).
ACT_FUNC_NAMES = frozenset(
    {
        "relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "prelu", "rrelu", "rrelu_", "elu", "elu_", "selu",
        "selu_", "celu", "celu_", "gelu", "silu", "silu_", "mish", "hardswish", "hardswish_", "hardsigmoid",
        "hardsigmoid_", "hardtanh", "hardtanh_", "sigmoid", "sigmoid_", "expit", "tanh", "tanh_", "softplus",
        "softsign", "softmax", "softmin", "log_softmax", "logsigmoid",
    }
)  # fmt: skip
#: Kinds with dead-unit statistics (output <= 0 is inactive), and output ranges of bounded kinds.
RECTIFIERS = frozenset(
    {"relu", "relu6", "leakyrelu", "leaky_relu", "prelu", "rrelu", "elu", "selu", "celu", "gelu", "silu", "mish",
     "hardswish", "swish", "quickgelu"}
)  # fmt: skip
BOUNDS = {"sigmoid": (0.0, 1.0), "tanh": (-1.0, 1.0), "hardsigmoid": (0.0, 1.0), "softsign": (-1.0, 1.0)}
SAT_EPS = 0.01
#: Class names that merely look like activations: suspicious when hookscope makes no site of them.
LOOKS_LIKE = ("relu", "gelu", "silu", "swish", "mish", "sigmoid", "tanh", "softmax", "activation")


#: Kind of each activation class name (lower-case names that are kinds themselves are left out).
_CLASS_KIND = {
    "LeakyReLU": "leaky_relu", "GELUActivation": "gelu", "NewGELUActivation": "gelu", "FastGELUActivation": "gelu",
    "QuickGELUActivation": "gelu", "ClippedGELUActivation": "gelu", "AccurateGELUActivation": "gelu",
    "GELUTanh": "gelu", "QuickGELU": "gelu", "SiLUActivation": "silu", "Swish": "silu", "MishActivation": "mish",
    "HardSwish": "hardswish", "HardSigmoid": "hardsigmoid", "LogSoftmax": "log_softmax", "LogSigmoid": "log_sigmoid",
}  # fmt: skip


def ref_kind_of_class(cls: type) -> str | None:
    for klass in cls.__mro__:
        if klass is nn.Module:
            return None
        if klass.__name__ in ACT_CLASS_NAMES:
            return _CLASS_KIND.get(klass.__name__, klass.__name__.lower())
    return None


def ref_kind_of_func(name: str) -> str:
    base = name.rstrip("_")
    return {"expit": "sigmoid", "logsigmoid": "log_sigmoid"}.get(base, base)


@dataclasses.dataclass
class RefSite:
    layer: str
    kind: str
    calls: int = 0
    elements: int = 0
    inactive: int = 0
    saturated: int = 0
    shape: tuple[int, ...] = ()
    unit_dim: int | None = None
    positive: torch.Tensor | None = None  # per unit, summed over calls
    backward: int = 0
    sumsq: float = 0.0

    @property
    def inactive_fraction(self) -> float:
        return self.inactive / self.elements if self.kind in RECTIFIERS and self.elements else math.nan

    @property
    def dead_ratio(self) -> float:
        if self.kind not in RECTIFIERS or self.positive is None:
            return math.nan
        return float((self.positive == 0).sum()) / self.positive.numel()

    @property
    def saturation_rate(self) -> float:
        return self.saturated / self.elements if self.kind in BOUNDS and self.elements else math.nan

    @property
    def grad_norm(self) -> float:
        return math.sqrt(self.sumsq) if self.backward else math.nan


class _RefMode(TorchFunctionMode):
    def __init__(self, ref: Reference) -> None:
        super().__init__()
        self.ref = ref

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if name in ACT_FUNC_NAMES and self.ref.act_depth == 0 and isinstance(out, torch.Tensor):
            self.ref.functional(name, out)
        return out


class Reference:
    """Independent per-site statistics of a model (see the module docstring). Wrap each top-level model call in
    :meth:`forward` (call indices restart there) and call :meth:`step` after each training step."""

    def __init__(self, model: nn.Module, expect_dim: Callable[[str, tuple[int, ...]], int | None]) -> None:
        self.expect_dim = expect_dim
        self.model = model
        self.stack: list[str] = []
        self.act_depth = 0
        self.counts: dict[str, int] = {}
        self.steps: list[dict[str, RefSite]] = []
        self.open: dict[str, RefSite] = {}
        self.order: list[str] = []  # sites in order of first call in the first step
        self.activation_modules: dict[str, str] = {}  # name -> kind of every activation module in named_modules()
        self.functional_calls = 0  # in the first step
        self._mode = _RefMode(self)
        self._handles = []
        for name, m in model.named_modules():
            kind = ref_kind_of_class(type(m))
            if kind is not None:
                self.activation_modules[name] = kind
            self._handles.append(m.register_forward_pre_hook(functools.partial(self._pre, name, kind)))
            self._handles.append(m.register_forward_hook(functools.partial(self._post, name, kind), always_call=True))

    @contextlib.contextmanager
    def forward(self) -> Iterator[None]:
        self.counts, self.stack, self.act_depth = {}, [], 0
        with self._mode:
            yield

    def step(self) -> None:
        self.steps.append(self.open)
        self.open = {}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def _pre(self, name: str, kind: str | None, module: nn.Module, args: Any) -> None:
        self.stack.append(name)
        if kind is not None:
            self.act_depth += 1

    def _post(self, name: str, kind: str | None, module: nn.Module, args: Any, out: Any) -> None:
        self.stack.pop()
        if kind is not None:
            self.act_depth -= 1
            if self.act_depth == 0 and isinstance(out, torch.Tensor):
                self._site(name, kind, out)

    def functional(self, fname: str, out: torch.Tensor) -> None:
        enclosing = self.stack[-1] if self.stack else ""
        if not self.steps:
            self.functional_calls += 1
        self._site(f"{enclosing}.{fname}()" if enclosing else f"{fname}()", ref_kind_of_func(fname), out)

    def _site(self, base: str, kind: str, out: torch.Tensor) -> None:
        if not out.requires_grad and torch.is_grad_enabled() and self.model.training:
            return  # not an activation of the network being trained (README, "Sites and their names")
        k = self.counts.get(base, 0)
        self.counts[base] = k + 1
        layer = base if k == 0 else f"{base}#{k}"
        if not self.steps and layer not in self.order:
            self.order.append(layer)
        site = self.open.get(layer)
        if site is None:
            site = self.open[layer] = RefSite(layer, kind)
        with torch._C.DisableTorchFunction(), torch.no_grad():
            y = out.detach()
            site.calls += 1
            site.elements += y.numel()
            site.shape = tuple(y.shape)
            if kind in RECTIFIERS:
                site.inactive += int((y <= 0).sum())
                dim = self.expect_dim(layer, site.shape)
                site.unit_dim = dim
                dims = [d for d in range(y.dim()) if d != (dim % y.dim() if dim is not None else -99)]
                pos = (y > 0).sum(dim=dims) if dims else (y > 0).long()
                pos = pos.reshape(-1).to(torch.int64)
                site.positive = pos if site.positive is None else site.positive + pos
            if kind in BOUNDS:
                lo, hi = BOUNDS[kind]
                w = SAT_EPS * (hi - lo)
                yd = y.double()
                site.saturated += int(((yd <= lo + w) | (yd >= hi - w)).sum())
        if out.requires_grad:
            out.register_hook(functools.partial(self._grad, site))

    @staticmethod
    def _grad(site: RefSite, g: torch.Tensor) -> None:
        with torch.no_grad():
            site.backward += 1
            site.sumsq += float(g.detach().double().pow(2).sum())


def own_param_norms(model: nn.Module) -> dict[str, tuple[float, float]]:
    """Per module owning parameters (each parameter under its first owner): (weight norm, grad norm) in float64,
    NaN grad norm when none of its parameters has a gradient."""
    seen: set[int] = set()
    out = {}
    for name, m in model.named_modules():
        own = [p for p in m.parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for p in m.parameters(recurse=False))
        if not own:
            continue
        w = math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in own))
        grads = [p.grad for p in own if p.grad is not None]
        g = math.sqrt(sum(float(t.double().pow(2).sum()) for t in grads)) if grads else math.nan
        out[name or "(root)"] = (w, g)
    return out


# ------------------------------------------------------------------------------------------------------------------
# Cases


def seed_all(s: int) -> None:
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)


@dataclasses.dataclass
class Case:
    """One model: ``build()`` (under seed 0) and ``train_step(model, optimizers, batch, fwd)``, where ``fwd()`` is a
    context manager to wrap each top-level call of (a part of) the model in."""

    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], Any]
    loss: Callable[[nn.Module, Any, Callable[[], contextlib.AbstractContextManager[None]]], torch.Tensor] | None
    #: (fnmatch pattern of layer names, unit dim) pairs, first match wins; else by ndim: 2-D and 4-D+ dim 1,
    #: 3-D ``dim3`` (the last dim for (B, T, F) sequences, 1 for (N, C, L) convolutions), 1-D 0.
    dims: tuple[tuple[str, int], ...] = ()
    dim3: int = 2
    lr: float = 0.01
    steps: int = 3
    #: For models with several optimizers (the GAN): (model, batch, fwd, optimizers) -> None, doing everything.
    custom_step: Callable[..., None] | None = None
    optimizers: Callable[[nn.Module], list[torch.optim.Optimizer]] | None = None
    note: str = ""

    def expect_dim(self, layer: str, shape: tuple[int, ...]) -> int | None:
        for pattern, dim in self.dims:
            if fnmatch.fnmatchcase(layer, pattern):
                return dim
        n = len(shape)
        if n == 0:
            return None
        if n == 1:
            return 0
        if n == 3:
            return self.dim3
        return 1

    def make_optimizers(self, model: nn.Module) -> list[torch.optim.Optimizer]:
        if self.optimizers is not None:
            return self.optimizers(model)
        return [torch.optim.SGD(model.parameters(), lr=self.lr, momentum=0.9)]

    def train_step(self, model: nn.Module, opts: list[torch.optim.Optimizer], batch: Any, fwd: Any) -> None:
        if self.custom_step is not None:
            self.custom_step(model, batch, fwd, opts)
            return
        for opt in opts:
            opt.zero_grad()
        loss = self.loss(model, batch, fwd)  # type: ignore[misc]
        loss.backward()
        for opt in opts:
            opt.step()


def _ce(model: nn.Module, batch: Any, fwd: Any) -> torch.Tensor:
    x, y = batch
    with fwd():
        out = model(x)
    if isinstance(out, dict):  # torchvision segmentation
        out = out["out"]
    if hasattr(out, "logits") and not isinstance(out, torch.Tensor):  # googlenet's named tuple
        aux = [a for a in (getattr(out, "aux_logits1", None), getattr(out, "aux_logits2", None)) if a is not None]
        return F.cross_entropy(out.logits, y) + 0.3 * sum(F.cross_entropy(a, y) for a in aux)
    return F.cross_entropy(out, y)


def _images(n: int = 2, size: int = 32, classes: int = 10) -> Callable[[torch.Generator], Any]:
    def make(gen: torch.Generator) -> Any:
        return torch.randn(n, 3, size, size, generator=gen), torch.randint(0, classes, (n,), generator=gen)

    return make


def _tv(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(weights=None, **kwargs)

    return build


def _timm(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, **kwargs)

    return build


def _vit_tv() -> nn.Module:
    import torchvision

    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
    )


# detection / segmentation


def _fasterrcnn() -> nn.Module:
    import torchvision

    return torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=3, min_size=128, max_size=128
    )


def _fasterrcnn_small() -> nn.Module:
    """The same detector with a narrower box head (torchvision's TwoMLPHead, F.relu twice) and fewer proposals:
    its stock 12.8M-parameter fc6 dominates the time of a test."""
    import torchvision
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=3, min_size=128, max_size=128, rpn_pre_nms_top_n_train=200,
        rpn_post_nms_top_n_train=100, box_batch_size_per_image=64,
    )  # fmt: skip
    model.roi_heads.box_head = TwoMLPHead(256 * 7 * 7, 64)
    model.roi_heads.box_predictor = FastRCNNPredictor(64, 3)
    return model


def _det_batch(gen: torch.Generator) -> Any:
    images = [torch.rand(3, 96, 96, generator=gen) for _ in range(2)]
    targets = []
    for _ in range(2):
        xy = torch.rand(2, 2, generator=gen) * 40
        wh = 20 + torch.rand(2, 2, generator=gen) * 30
        targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(1, 3, (2,), generator=gen)})
    return images, targets


def _det_loss(model: nn.Module, batch: Any, fwd: Any) -> torch.Tensor:
    images, targets = batch
    with fwd():
        losses = model(images, targets)
    assert isinstance(losses, dict), type(losses)
    return sum(losses.values())  # type: ignore[return-value]


def _deeplab() -> nn.Module:
    import torchvision

    return torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=3
    )


def _seg_batch(gen: torch.Generator) -> Any:
    return torch.randn(2, 3, 64, 64, generator=gen), torch.randint(0, 3, (2, 64, 64), generator=gen)


# Hugging Face, from configs


def _hf(model_cls: str, config_cls: str, **config: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        cfg = getattr(transformers, config_cls)(**config)
        return getattr(transformers, model_cls)(cfg)

    return build


def _tokens(vocab: int = 64, n: int = 2, t: int = 8, labels: str = "class") -> Callable[[torch.Generator], Any]:
    def make(gen: torch.Generator) -> Any:
        ids = torch.randint(1, vocab, (n, t), generator=gen)
        if labels == "class":
            return {"input_ids": ids, "labels": torch.randint(0, 2, (n,), generator=gen)}
        if labels == "lm":
            return {"input_ids": ids, "labels": ids.clone()}
        return {"input_ids": ids, "labels": torch.randint(1, vocab, (n, 5), generator=gen)}  # seq2seq

    return make


def _hf_loss(model: nn.Module, batch: Any, fwd: Any) -> torch.Tensor:
    with fwd():
        out = model(**batch)
    return out.loss


def _whisper_batch(gen: torch.Generator) -> Any:
    return {
        "input_features": torch.randn(2, 8, 32, generator=gen),  # (B, mel bins, 2 * max_source_positions)
        "labels": torch.randint(3, 64, (2, 5), generator=gen),
    }


def _wav2vec2_batch(gen: torch.Generator) -> Any:
    return {"input_values": torch.randn(2, 1600, generator=gen), "labels": torch.randint(1, 16, (2, 5), generator=gen)}


def _hf_image_batch(gen: torch.Generator) -> Any:
    return {
        "pixel_values": torch.randn(2, 3, 32, 32, generator=gen),
        "labels": torch.randint(0, 10, (2,), generator=gen),
    }


# torch's own layers


def _seq_batch(gen: torch.Generator) -> Any:
    return torch.randn(2, 6, 8, generator=gen), torch.randint(0, 3, (2,), generator=gen)


def _rnn_loss(model: nn.Module, batch: Any, fwd: Any) -> torch.Tensor:
    x, _ = batch
    with fwd():
        out, _ = model(x)
    return out.pow(2).mean()


class LSTMHead(nn.Module):
    """An LSTM followed by a Linear+ReLU head on its last time step, and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 16, batch_first=True)
        self.fc = nn.Linear(16, 12)
        self.relu = nn.ReLU()
        self.out = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(x)
        return self.out(self.relu(self.fc(h[:, -1])))


def _encoder_layer() -> nn.Module:
    return nn.TransformerEncoderLayer(d_model=32, nhead=2, dim_feedforward=48, batch_first=True)


def _tok_seq_batch(gen: torch.Generator) -> Any:
    return torch.randn(2, 6, 32, generator=gen)


def _mean_sq(model: nn.Module, batch: Any, fwd: Any) -> torch.Tensor:
    with fwd():
        out = model(batch)
    return out.pow(2).mean()


class GAN(nn.Module):
    """A small DCGAN: the generator and the discriminator in one container, trained with two Adam optimizers."""

    def __init__(self) -> None:
        super().__init__()
        self.G = nn.Sequential(
            nn.Linear(8, 32 * 4 * 4), nn.ReLU(), nn.Unflatten(1, (32, 4, 4)),
            nn.ConvTranspose2d(32, 16, 4, 2, 1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.ConvTranspose2d(16, 1, 4, 2, 1), nn.Tanh(),
        )  # fmt: skip
        self.D = nn.Sequential(
            nn.Conv2d(1, 16, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(16, 32, 4, 2, 1), nn.BatchNorm2d(32), nn.LeakyReLU(0.2),
            nn.Flatten(), nn.Linear(32 * 4 * 4, 1), nn.Sigmoid(),
        )  # fmt: skip


def _gan_batch(gen: torch.Generator) -> Any:
    return torch.rand(4, 1, 16, 16, generator=gen) * 2 - 1, torch.randn(4, 8, generator=gen)


def _gan_optimizers(model: nn.Module) -> list[torch.optim.Optimizer]:
    return [
        torch.optim.Adam(model.G.parameters(), lr=2e-3, betas=(0.5, 0.999)),
        torch.optim.Adam(model.D.parameters(), lr=2e-3, betas=(0.5, 0.999)),
    ]


def _gan_step(model: nn.Module, batch: Any, fwd: Any, opts: list[torch.optim.Optimizer]) -> None:
    real, z = batch
    opt_g, opt_d = opts
    ones, zeros = torch.ones(len(real), 1), torch.zeros(len(real), 1)
    opt_d.zero_grad()
    with fwd():
        d_real = model.D(real)
    with fwd():
        fake = model.G(z)
    with fwd():
        d_fake = model.D(fake.detach())
    loss_d = F.binary_cross_entropy(d_real, ones) + F.binary_cross_entropy(d_fake, zeros)
    loss_d.backward()
    opt_d.step()
    opt_g.zero_grad()
    with fwd():
        d_gen = model.D(fake)
    F.binary_cross_entropy(d_gen, ones).backward()
    opt_g.step()


CNN = "CNN: dim 1"
CASES: dict[str, Case] = {
    c.name: c
    for c in [
        # torchvision
        Case("tv_resnet18", _tv("resnet18", num_classes=10), _images(), _ce, note="in-place ReLU, module reuse"),
        Case("tv_mobilenet_v3_small", _tv("mobilenet_v3_small", num_classes=10), _images(), _ce),
        Case("tv_efficientnet_b0", _tv("efficientnet_b0", num_classes=10), _images(), _ce),
        Case("tv_convnext_tiny", _tv("convnext_tiny", num_classes=10), _images(), _ce, dims=(("*.block.4", 3),),
             note="GELU on (N, H, W, C)"),
        Case("tv_swin_t", _tv("swin_t", num_classes=10), _images(), _ce,
             dims=(("*.mlp.1", 3), ("*.softmax()*", 1)), note="GELU on (N, H, W, C)"),
        Case("tv_vit", _vit_tv, _images(), _ce),
        Case("tv_googlenet", _tv("googlenet", num_classes=10, init_weights=False), _images(size=64), _ce,
             note="57 F.relu, aux heads"),
        Case("tv_densenet121", _tv("densenet121", num_classes=10), _images(), _ce),
        Case("tv_fasterrcnn_mobilenet_v3_large_320_fpn", _fasterrcnn, _det_batch, _det_loss,
             note="train mode with targets: loss dict"),
        Case("tv_fasterrcnn_small", _fasterrcnn_small, _det_batch, _det_loss, note="a narrower box head"),
        Case("tv_deeplabv3_mobilenet_v3_large", _deeplab, _seg_batch, _ce, note="dict output"),
        # timm
        Case("timm_resnet18", _timm("resnet18", num_classes=10), _images(), _ce),
        Case("timm_convnext_atto", _timm("convnext_atto", num_classes=10), _images(), _ce,
             note="timm's convnext_atto sets conv_mlp=True: 1x1 Conv2d MLP, GELU on (N, C, H, W)"),
        Case("timm_convnext_atto_nhwc", _timm("convnext_atto", num_classes=10, conv_mlp=False), _images(), _ce,
             dims=(("*.mlp.act", 3),), note="conv_mlp=False: Linear MLP, GELU on (N, H, W, C)"),
        Case("timm_vit_tiny_patch16_224", _timm("vit_tiny_patch16_224", num_classes=10, img_size=32), _images(),
             _ce),
        Case("timm_efficientnet_b0", _timm("efficientnet_b0", num_classes=10), _images(), _ce),
        # Hugging Face
        Case("hf_bert", _hf("BertForSequenceClassification", "BertConfig", vocab_size=64, hidden_size=32,
             num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, max_position_embeddings=16),
             _tokens(), _hf_loss, dims=(("*.softmax()*", 1),)),
        Case("hf_bert_eager", _hf("BertForSequenceClassification", "BertConfig", vocab_size=64, hidden_size=32,
             num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, max_position_embeddings=16,
             attn_implementation="eager"), _tokens(), _hf_loss, dims=(("*.softmax()*", 1),),
             note="eager attention: functional softmax sites"),
        Case("hf_gpt2", _hf("GPT2LMHeadModel", "GPT2Config", vocab_size=64, n_positions=16, n_embd=32, n_layer=2,
             n_head=2), _tokens(labels="lm"), _hf_loss, dims=(("*.softmax()*", 1),)),
        Case("hf_t5", _hf("T5ForConditionalGeneration", "T5Config", vocab_size=64, d_model=32, d_kv=8, d_ff=48,
             num_layers=2, num_decoder_layers=2, num_heads=4, decoder_start_token_id=0, pad_token_id=0),
             _tokens(labels="seq2seq"), _hf_loss, dims=(("*.softmax()*", 1),)),
        Case("hf_whisper", _hf("WhisperForConditionalGeneration", "WhisperConfig", vocab_size=64, num_mel_bins=8,
             encoder_layers=1, decoder_layers=1, d_model=24, encoder_attention_heads=2, decoder_attention_heads=2,
             encoder_ffn_dim=40, decoder_ffn_dim=40, max_source_positions=16, max_target_positions=16,
             pad_token_id=1, bos_token_id=2, eos_token_id=2, decoder_start_token_id=2),
             _whisper_batch, _hf_loss, dims=(("model.encoder.gelu()*", 1), ("*.softmax()*", 1)),
             note="Conv1d front-end with F.gelu on (N, C, L)"),
        Case("hf_wav2vec2", _hf("Wav2Vec2ForCTC", "Wav2Vec2Config", vocab_size=16, hidden_size=32,
             num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, conv_dim=(16, 16),
             conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4,
             pad_token_id=0), _wav2vec2_batch, _hf_loss,
             dims=(("*feature_extractor.conv_layers.*", 1), ("*pos_conv_embed.*", 1), ("*.softmax()*", 1)),
             note="feature extractor convs (group norm) + pos_conv_embed, SpecAugment (numpy RNG)"),
        Case("hf_wav2vec2_layernorm", _hf("Wav2Vec2ForCTC", "Wav2Vec2Config", vocab_size=16, hidden_size=32,
             num_hidden_layers=1, num_attention_heads=2, intermediate_size=48, conv_dim=(16, 16),
             conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4,
             feat_extract_norm="layer", do_stable_layer_norm=True, pad_token_id=0), _wav2vec2_batch, _hf_loss,
             dims=(("*feature_extractor.conv_layers.*", 1), ("*pos_conv_embed.*", 1), ("*.softmax()*", 1)),
             note="feat_extract_norm='layer': conv, transpose, LayerNorm, transpose back, GELU"),
        Case("hf_distilbert", _hf("DistilBertForSequenceClassification", "DistilBertConfig", vocab_size=64, dim=32,
             n_layers=2, n_heads=2, hidden_dim=48, max_position_embeddings=16), _tokens(), _hf_loss,
             dims=(("*.softmax()*", 1),)),
        Case("hf_vit", _hf("ViTForImageClassification", "ViTConfig", image_size=32, patch_size=8, hidden_size=32,
             num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, num_labels=10), _hf_image_batch,
             _hf_loss, dims=(("*.softmax()*", 1),)),
        # torch's own layers
        Case("lstm", lambda: nn.LSTM(8, 16, batch_first=True), _seq_batch, _rnn_loss, note="no site: one warning"),
        Case("gru", lambda: nn.GRU(8, 16, batch_first=True), _seq_batch, _rnn_loss, note="no site: one warning"),
        Case("lstm_head", LSTMHead, _seq_batch, _ce),
        Case("transformer_encoder_layer", _encoder_layer, _tok_seq_batch, _mean_sq, note="functional F.relu"),
        Case("gan", GAN, _gan_batch, None, custom_step=_gan_step, optimizers=_gan_optimizers,
             note="G once, D three times per step, two optimizers"),
    ]
}  # fmt: skip


# ------------------------------------------------------------------------------------------------------------------
# Running a case


@dataclasses.dataclass
class Result:
    name: str
    hm: Any
    ref: Reference
    inst: nn.Module
    plain: nn.Module
    ref_model: nn.Module
    param_refs: list[dict[str, tuple[float, float]]]  # per step, at hm.step()
    warnings: list[str]  # hookscope's
    other_warnings: list[str]
    time_plain: list[float]
    time_inst: list[float]
    case: Case

    def frame(self) -> Any:
        return self.hm.to_dataframe()


@contextlib.contextmanager
def _restored(target: set[str], saved: set[str]) -> Iterator[None]:
    try:
        yield
    finally:
        target.clear()
        target.update(saved)


def run_case(case: Case, steps: int | None = None, warmup: int = 0) -> Result:
    """Train plain, instrumented and reference copies of ``case`` for ``steps`` steps with identical weights,
    seeds and data (see the module docstring). ``warmup``: untimed steps of a throwaway copy first (the
    allocator and first-call costs), for the timings only."""
    import hookscope
    from hookscope import HookManager

    steps = case.steps if steps is None else steps
    seed_all(0)
    model = case.build()
    model.train()
    plain, ref_model = copy.deepcopy(model), copy.deepcopy(model)
    warm = copy.deepcopy(model) if warmup else None
    inst = model
    gen = torch.Generator().manual_seed(1)
    batches = [case.batch(gen) for _ in range(steps)]
    reference = Reference(ref_model, case.expect_dim)
    nothing = contextlib.nullcontext

    param_refs: list[dict[str, tuple[float, float]]] = []
    seen = set(hookscope.warn._seen)
    hookscope.warn._seen.clear()  # warn_once is per process: each case starts afresh, and leaves it as it was
    with warnings.catch_warnings(record=True) as caught, _restored(hookscope.warn._seen, seen):
        warnings.simplefilter("always")
        if warm is not None:
            opts = case.make_optimizers(warm)
            for s, batch in enumerate(batches):
                seed_all(100 + s)
                case.train_step(warm, opts, batch, nothing)
            del warm, opts
        hm = HookManager(inst, params=True)
        hm.attach()
        copies = ((plain, nothing), (inst, nothing), (ref_model, reference.forward))
        optimizers = [case.make_optimizers(m) for m, _ in copies]
        time_plain, time_inst = [], []
        for s, batch in enumerate(batches):  # the copies take turns, so that load from elsewhere hits all alike
            for i, ((m, fwd), opts) in enumerate(zip(copies, optimizers)):
                seed_all(100 + s)  # dropout, layerdrop, SpecAugment, detection samplers: the same for every copy
                t0 = time.perf_counter()
                case.train_step(m, opts, batch, fwd)
                if i == 1:
                    t1 = time.perf_counter()
                    param_refs.append(own_param_norms(inst))  # .grad as hm.step() sees it
                    t2 = time.perf_counter()
                    hm.step()
                    time_inst.append(time.perf_counter() - t2 + t1 - t0)
                elif i == 0:
                    time_plain.append(time.perf_counter() - t0)
                else:
                    reference.step()
        hm.detach()
        reference.remove()
    ours = [str(w.message) for w in caught if issubclass(w.category, hookscope.HookscopeWarning)]
    other = sorted(
        {
            f"{w.category.__name__}: {str(w.message)[:160]}"
            for w in caught
            if not issubclass(w.category, hookscope.HookscopeWarning)
        }
    )
    return Result(
        case.name, hm, reference, inst, plain, ref_model, param_refs, ours, other, time_plain, time_inst, case
    )


# ------------------------------------------------------------------------------------------------------------------
# Checks: each returns a list of problems (empty: fine)


def _close(a: float, b: float, rel: float = 1e-5) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-30)


def check_identical_training(r: Result) -> list[str]:
    bad = []
    for (name, a), (_, b) in zip(r.plain.state_dict().items(), r.inst.state_dict().items()):
        if isinstance(a, torch.Tensor) and not torch.equal(a, b):
            bad.append(f"{name} differs after training: max |diff| {(a.double() - b.double()).abs().max():.3g}")
    for (name, a), (_, b) in zip(r.plain.state_dict().items(), r.ref_model.state_dict().items()):
        if isinstance(a, torch.Tensor) and not torch.equal(a, b):
            bad.append(f"reference copy: {name} differs from the plain copy (the reference itself is wrong)")
    return bad


def check_sites(r: Result) -> list[str]:
    """Sites equal the reference's, by name and kind, in the same order."""
    got = [(s.layer, s.kind) for s in r.hm.sites]
    first = r.ref.steps[0] if r.ref.steps else {}
    want = [(layer, first[layer].kind) for layer in r.ref.order]
    if got == want:
        return []
    gs, ws = dict(got), dict(want)
    problems = []
    missing = [f"{n} ({k})" for n, k in want if n not in gs]
    extra = [f"{n} ({k})" for n, k in got if n not in ws]
    kinds = [f"{n}: {gs[n]} vs {k}" for n, k in want if n in gs and gs[n] != k]
    if missing:
        problems.append(f"missed sites: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if extra:
        problems.append(f"extra sites: {extra[:8]}{' ...' if len(extra) > 8 else ''}")
    if kinds:
        problems.append(f"kinds differ: {kinds[:8]}")
    if not (missing or extra or kinds):
        problems.append("site order differs")
    return problems


def check_units(r: Result) -> list[str]:
    problems = []
    for s in r.hm.sites:
        if not s.units_fixed:
            continue
        want = r.case.expect_dim(s.layer, s.shape)
        want = None if want is None else want % max(len(s.shape), 1)
        if s.unit_dim != want:
            problems.append(f"{s.layer} ({s.kind}, shape {list(s.shape)}): unit_dim {s.unit_dim}, expected {want}")
        elif want is not None and s.units != s.shape[want]:
            problems.append(f"{s.layer}: units {s.units}, expected {s.shape[want]}")
    return problems


def check_stats(r: Result, layers: list[str] | None = None) -> tuple[list[str], int]:
    """Per step and site: calls, shape, inactive_fraction and dead_ratio and saturation_rate exactly, grad_norm to
    1e-5 relative. Returns the problems and the number of (step, site) rows compared."""
    frame = r.hm.to_dataframe()
    problems = []
    compared = 0
    for step, sites in enumerate(r.ref.steps):
        rows = frame[frame["step"] == step]
        by_layer = {row.layer: row for row in rows.itertuples(index=False)}
        if layers is None and set(by_layer) != set(sites):
            problems.append(f"step {step}: rows {sorted(set(by_layer) ^ set(sites))[:6]} differ from the reference")
        for layer, want in sites.items():
            if layers is not None and layer not in layers:
                continue
            row = by_layer.get(layer)
            if row is None:
                continue
            compared += 1
            exact = {
                "calls": (row.calls, want.calls),
                "shape": (row.shape, "x".join(map(str, want.shape))),
                "inactive_fraction": (row.inactive_fraction, want.inactive_fraction),
                "dead_ratio": (row.dead_ratio, want.dead_ratio),
                "saturation_rate": (row.saturation_rate, want.saturation_rate),
            }
            for col, (a, b) in exact.items():
                same = (a == b) or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))
                if not same:
                    problems.append(f"step {step} {layer} {col}: hookscope {a!r}, reference {b!r}")
            if not _close(float(row.grad_norm), want.grad_norm):
                problems.append(
                    f"step {step} {layer} grad_norm: hookscope {row.grad_norm!r}, reference {want.grad_norm!r}"
                )
    return problems, compared


def _rel(a: float, b: float) -> float:
    if math.isnan(a) or math.isnan(b):
        return 0.0 if math.isnan(a) and math.isnan(b) else math.inf
    return abs(a - b) / max(abs(a), abs(b), 1e-30)


def check_params(r: Result, modules: list[str] | None = None, rel: float = 1e-5) -> list[str]:
    """``param_frame()``: one row per module owning parameters per step, in ``named_modules()`` order, and
    ``weight_norm`` / ``grad_norm`` equal to the float64 norms of its own parameters and their ``.grad`` (of
    ``modules`` only, when given) to ``rel``."""
    frame = r.hm.param_frame()
    problems = []
    if sorted(set(frame["step"])) != list(range(len(r.param_refs))):
        problems.append(f"param_frame steps {sorted(set(frame['step']))}, expected {len(r.param_refs)} steps")
    for step, want in enumerate(r.param_refs):
        rows = frame[frame["step"] == step]
        if list(rows["module"]) != list(want):
            problems.append(f"step {step}: param_frame has {len(rows)} rows, {len(want)} modules own parameters")
            continue
        for row in rows.itertuples(index=False):
            if modules is not None and row.module not in modules:
                continue
            w, g = want[row.module]
            for col, a, b in (("weight_norm", row.weight_norm, w), ("grad_norm", row.grad_norm, g)):
                if _rel(a, b) > rel:
                    problems.append(
                        f"step {step} {row.module} ({row.params} params) {col}: {a!r} vs {b!r} "
                        f"(relative {_rel(a, b):.1e})"
                    )
    return problems


def param_errors(r: Result) -> dict[str, Any]:
    """The largest relative errors of ``param_frame()`` against float64 norms, and where."""
    frame = r.hm.param_frame()
    worst: dict[str, Any] = {"weight_norm": (0.0, None), "grad_norm": (0.0, None)}
    for step, want in enumerate(r.param_refs):
        for row in frame[frame["step"] == step].itertuples(index=False):
            if row.module not in want:
                continue
            w, g = want[row.module]
            for col, a, b in (("weight_norm", row.weight_norm, w), ("grad_norm", row.grad_norm, g)):
                e = _rel(a, b)
                if e > worst[col][0]:
                    worst[col] = (e, f"{row.module} ({row.params} params)")
    return worst


def check_reports(r: Result) -> list[str]:
    """Every report works: to_dataframe, table (rich and ASCII), last_step_frame, to_csv, param_frame, param_table,
    unit_timeline, dead_units."""
    from rich.console import Console

    hm = r.hm
    problems = []
    try:
        frame = hm.to_dataframe()
        if list(frame.columns)[:10] != [
            "step",
            "layer",
            "kind",
            "shape",
            "units",
            "calls",
            "dead_ratio",
            "inactive_fraction",
            "saturation_rate",
            "grad_norm",
        ]:
            problems.append(f"to_dataframe columns {list(frame.columns)}")
        for ascii_ in (False, True):
            console = Console(file=io.StringIO(), width=160, color_system=None)
            console.print(hm.table(ascii=ascii_))
            text = console.file.getvalue()  # type: ignore[attr-defined]
            if len(hm.sites) and hm.sites[0].layer[:20] not in text:
                problems.append("table() does not show the first layer")
        hm.last_step_frame()
        console = Console(file=io.StringIO(), width=160, color_system=None)
        console.print(hm.param_table(ascii=True))
        with tempfile.TemporaryDirectory() as d:
            hm.to_csv(os.path.join(d, "stats.csv"))
            hm.param_to_csv(os.path.join(d, "params.csv"))
        hm.unit_timeline()
        rect = [s for s in hm.sites if s.kind in RECTIFIERS and s.units_fixed]
        if rect:
            hm.dead_units(rect[0].layer)
    except Exception as e:  # a report that raises is the problem to report
        problems.append(f"report raised {type(e).__name__}: {e}")
    return problems


def summarize(r: Result) -> dict[str, Any]:
    first = r.ref.steps[0] if r.ref.steps else {}
    stats, compared = check_stats(r)
    median = lambda ts: min(ts[1:]) if len(ts) > 1 else ts[0]  # noqa: E731  (the least disturbed by other load)
    return {
        "model": r.name,
        "sites": len(r.hm.sites),
        "ref_sites": len(r.ref.order),
        "act_modules": len(r.ref.activation_modules),
        "ref_functional": r.ref.functional_calls,
        "unit_dims": sorted({f"{s.unit_dim}/{len(s.shape)}D" for s in r.hm.sites}),
        "problems": {
            "sites": check_sites(r),
            "units": check_units(r),
            "stats": stats,
            "params": [p for p in check_params(r) if "relative" not in p],  # precision: see param_errors
            "training": check_identical_training(r),
            "reports": check_reports(r),
        },
        "compared": compared,
        "param_errors": param_errors(r),
        "param_modules": len(r.param_refs[0]) if r.param_refs else 0,
        "warnings": r.warnings,
        "other_warnings": r.other_warnings,
        "ms_plain": 1e3 * median(r.time_plain),
        "ms_inst": 1e3 * median(r.time_inst),
        "ms_inst_first": 1e3 * r.time_inst[0],
        "ms_plain_first": 1e3 * r.time_plain[0],
        "unmatched_lookalikes": sorted(
            {
                f"{n} ({type(m).__name__})"
                for n, m in r.inst.named_modules()
                if any(k in type(m).__name__.lower() for k in LOOKS_LIKE)
                and ref_kind_of_class(type(m)) is None
                and not list(m.children())
            }
        ),
        "first": len(first),
    }


def main(argv: list[str]) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help=f"cases (fnmatch patterns; default all): {', '.join(CASES)}")
    parser.add_argument("--json", help="write the summaries here")
    parser.add_argument("--steps", type=int, help="training steps (default: each case's, 3)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n for n in CASES if not args.names or any(fnmatch.fnmatch(n, p) for p in args.names)]
    out = []
    for name in names:
        t0 = time.perf_counter()
        try:
            summary = summarize(run_case(CASES[name], steps=args.steps, warmup=1))
        except Exception as e:
            import traceback

            traceback.print_exc()
            summary = {"model": name, "crash": f"{type(e).__name__}: {e}"}
        summary["wall_s"] = time.perf_counter() - t0
        out.append(summary)
        print(json.dumps(summary, default=str), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

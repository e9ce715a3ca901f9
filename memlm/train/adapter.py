"""What a trained memory mode implements to be trained by `memlm.train.Trainer`, and the proof one.

An `Adapter` is an `nn.Module` holding only trainable parameters. It attaches itself to a frozen
owned `Llama` through the model's extension points (`layers[i].after_attention`,
`layers[i].feed_forward`, `layers[i].attention.backend`, `prefix_embeds`), says which parameters
go in which learning-rate group, turns a `TrainBatch` into a loss, and declares `first_layer`: the
lowest layer whose input it changes. The hidden states entering that layer are a function of the
tokens alone, which is what lets the trainer cache them (`memlm.train.hidden_cache`).

`BottleneckAdapter` ("proof") is the mode that proves the trainer: a residual bottleneck
x + up(silu(down(norm(x)))) after the attention of a few upper layers, `up` zero-initialised so
that before training the model is exactly the base model. RETRO cross-attention, landmark
attention, RMT and product-key memory register here the same way (`ADAPTERS`).
"""
from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memlm.model.llama import Llama, LlamaConfig


@dataclass
class TrainBatch:
    """One micro-batch. tokens (B, T + 1): inputs are tokens[:, :-1], targets tokens[:, 1:].
    hidden (B, T, D), when given, are the frozen model's states entering `first_layer` for those
    inputs (from the hidden-state cache); a mode may add its own fields (retrieved neighbours...)."""

    tokens: Tensor
    hidden: Optional[Tensor] = None


@dataclass(frozen=True)
class ParamGroup:
    name: str
    params: list[nn.Parameter]
    lr_scale: float = 1.0  # this group's learning rate is the schedule's times lr_scale
    weight_decay: float = 0.0


def lower_hidden(model: Llama, tokens: Tensor, end_layer: int) -> Tensor:
    """The states entering layer end_layer for tokens (B, T): embeddings through layers
    [0, end_layer). -> (B, T, D). Run under no_grad by callers (the base is frozen)."""
    input_pos = torch.arange(tokens.shape[1], device=tokens.device)
    return model.forward_embeds(model.embed(tokens), input_pos, layers=slice(end_layer), norm=False)


def next_token_loss(model: Llama, batch: TrainBatch, first_layer: int) -> Tensor:
    """Mean next-token cross-entropy over the batch's B * T targets, starting from batch.hidden
    at first_layer when it is there, else from the tokens."""
    inputs, targets = batch.tokens[:, :-1], batch.tokens[:, 1:]  # each (B, T)
    if batch.hidden is not None:
        x = batch.hidden
    else:
        with torch.no_grad():  # the frozen lower layers: nothing to differentiate
            x = lower_hidden(model, inputs, first_layer)
    input_pos = torch.arange(x.shape[1], device=x.device)
    logits = model.output(model.forward_embeds(x, input_pos, layers=slice(first_layer, None)))  # (B, T, V)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten().long())


class Adapter(nn.Module, abc.ABC):
    """A trainable memory mode's parameters and how they plug into a frozen `Llama`."""

    mode: ClassVar[str]  # the name `memlm train MODE` and the manifest use

    @property
    @abc.abstractmethod
    def first_layer(self) -> int:
        """Lowest layer whose input this adapter changes (0 if it changes the embeddings or adds
        prefix_embeds): the states entering it depend on the tokens alone."""

    @abc.abstractmethod
    def attach(self, model: Llama) -> None:
        """Insert this adapter's modules into the model's extension points."""

    @abc.abstractmethod
    def detach(self, model: Llama) -> None:
        """Undo `attach`: the model is the base model again."""

    @abc.abstractmethod
    def config_dict(self) -> dict[str, Any]:
        """JSON-able settings `from_config` rebuilds the adapter from (saved in the manifest)."""

    @classmethod
    @abc.abstractmethod
    def from_config(cls, model_config: LlamaConfig, config: dict[str, Any], seed: int = 0) -> "Adapter": ...

    def param_groups(self) -> list[ParamGroup]:
        """The learning-rate groups; by default every parameter in one group."""
        return [ParamGroup("all", list(self.parameters()))]

    def make_batch(self, tokens: Tensor, hidden: Optional[Tensor], extra: dict[str, Any]) -> TrainBatch:
        """The micro-batch `loss` takes; `extra` is the trainer's `batch_data` for it (a mode's own
        fields: RETRO's neighbours)."""
        if extra:
            raise ValueError(f"{type(self).__name__} takes no extra batch data, got {sorted(extra)}")
        return TrainBatch(tokens, hidden)

    def loss(self, model: Llama, batch: TrainBatch) -> Tensor:
        """A scalar to minimise for one micro-batch (mean over its target tokens)."""
        return next_token_loss(model, batch, self.first_layer)


def attach_after_attention(model: Llama, modules: "nn.ModuleDict") -> None:
    """Append each of {layer index (str): module} to that layer's `after_attention` (once)."""
    for i, module in modules.items():
        hooks = model.layers[int(i)].after_attention
        if not any(m is module for m in hooks):
            hooks.append(module)


def detach_after_attention(model: Llama, modules: "nn.ModuleDict") -> None:
    """Undo `attach_after_attention`."""
    for i, module in modules.items():
        hooks = model.layers[int(i)].after_attention
        for k in reversed([k for k, m in enumerate(hooks) if m is module]):
            del hooks[k]


@dataclass
class BottleneckConfig:
    layers: tuple[int, ...] = (20, 23, 26, 29)  # where the adapters sit (negative: from the top)
    bottleneck: int = 64  # width of the down-projection


class ResidualBottleneck(nn.Module):
    """x + up(silu(down(rmsnorm(x)))), up zero-initialised: the identity until trained.
    Sits in `Block.after_attention`, so it has the (x, input_pos) -> x signature."""

    def __init__(self, dim: int, bottleneck: int, eps: float, generator: torch.Generator):
        super().__init__()
        self.eps = eps
        self.norm_weight = nn.Parameter(torch.ones(dim))
        self.down = nn.Parameter(torch.randn(bottleneck, dim, generator=generator) / dim ** 0.5)  # (r, D)
        self.up = nn.Parameter(torch.zeros(dim, bottleneck))  # (D, r): zero, so x + 0 == x exactly

    def forward(self, x: Tensor, input_pos: Tensor) -> Tensor:
        h = F.rms_norm(x, (x.shape[-1],), self.norm_weight.to(x.dtype), self.eps)  # (B, T, D)
        return x + F.linear(F.silu(F.linear(h, self.down.to(x.dtype))), self.up.to(x.dtype))  # (B, T, D)


class BottleneckAdapter(Adapter):
    """The proof adapter: a `ResidualBottleneck` after the attention of each of `config.layers`."""

    mode = "proof"

    def __init__(self, model_config: LlamaConfig, config: BottleneckConfig = BottleneckConfig(), seed: int = 0):
        super().__init__()
        n = model_config.n_layers
        layers = sorted({i % n for i in config.layers})
        if any(not -n <= i < n for i in config.layers) or not layers:
            raise ValueError(f"adapter layers {config.layers} do not fit a model of {n} layers")
        self.config = BottleneckConfig(tuple(layers), config.bottleneck)
        generator = torch.Generator().manual_seed(seed)
        self.blocks = nn.ModuleDict({str(i): ResidualBottleneck(model_config.dim, config.bottleneck,
                                                                model_config.rms_norm_eps, generator)
                                     for i in layers})

    @property
    def first_layer(self) -> int:
        return self.config.layers[0]

    def attach(self, model: Llama) -> None:
        attach_after_attention(model, self.blocks)

    def detach(self, model: Llama) -> None:
        detach_after_attention(model, self.blocks)

    def config_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self.config).items()}

    @classmethod
    def from_config(cls, model_config: LlamaConfig, config: dict[str, Any], seed: int = 0) -> "BottleneckAdapter":
        cfg = dict(config)
        if "layers" in cfg:
            cfg["layers"] = tuple(cfg["layers"])
        return cls(model_config, BottleneckConfig(**cfg), seed)

    def param_groups(self) -> list[ParamGroup]:
        # Projections decay towards zero (towards the base model); norm gains do not decay.
        mats = [p for b in self.blocks.values() for p in (b.down, b.up)]
        norms = [b.norm_weight for b in self.blocks.values()]
        return [ParamGroup("projections", mats, 1.0, 0.01), ParamGroup("norms", norms, 1.0, 0.0)]


ADAPTERS: dict[str, type[Adapter]] = {BottleneckAdapter.mode: BottleneckAdapter}
TRAINED_MODES = ("retro", "landmark")  # memory modes whose package has an `adapter` module exporting ADAPTER


def adapter_class(mode: str) -> type[Adapter]:
    """The proof adapter, or a trained memory mode's (`memlm.modes.<mode>.adapter.ADAPTER`)."""
    if mode in ADAPTERS:
        return ADAPTERS[mode]
    if mode in TRAINED_MODES:
        import importlib

        return importlib.import_module(f"memlm.modes.{mode}.adapter").ADAPTER
    raise ValueError(f"unknown training mode {mode!r}: expected one of {', '.join((*ADAPTERS, *TRAINED_MODES))}")

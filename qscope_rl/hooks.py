"""Forward hooks on the residual stream at the output of a decoder layer: capture and steer.

The hook point is Qwen-Scope's: the output of decoder layer L, i.e. HF ``output_hidden_states[L + 1]``.
Every hook lives in a context manager and is removed on every exit path, exceptions included.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

# Where decoder layers live, tried in order after unwrapping DDP / DeepSpeed / PEFT wrappers.
_LAYER_PATHS = (
    "model.layers",  # Llama, Qwen2/3, Qwen3-MoE, Qwen3.5(-MoE) CausalLM, Gemma, Mistral
    "model.language_model.layers",  # Qwen3.5 / Qwen3-VL ConditionalGeneration (transformers 5)
    "language_model.model.layers",  # older multimodal layouts
    "model.decoder.layers",  # OPT-style
    "transformer.h",  # GPT-2, GPT-J
    "gpt_neox.layers",  # Pythia
    "layers",  # a bare decoder model (Qwen3Model, ...)
)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / DeepSpeed / FSDP (``.module``) and PEFT (``get_base_model``) wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
    return model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM (through any wrapper), as an ``nn.ModuleList``."""
    base = unwrap_model(model)
    for path in _LAYER_PATHS:
        module = base
        for name in path.split("."):
            module = getattr(module, name, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return module
    raise ValueError(
        f"cannot find the decoder layers of {type(base).__name__}: looked for {', '.join(_LAYER_PATHS)}"
    )


def decoder_layer(model: nn.Module, layer: int) -> nn.Module:
    """Decoder layer ``layer`` (0-based), with a clear error when the model does not have it."""
    layers = decoder_layers(model)
    if not isinstance(layer, int) or not 0 <= layer < len(layers):
        raise ValueError(
            f"layer {layer!r} does not exist: {type(unwrap_model(model)).__name__} has {len(layers)} "
            f"decoder layers (0..{len(layers) - 1})"
        )
    return layers[layer]


def hidden_size(model: nn.Module) -> int:
    """The residual-stream width of a HF model (text config for multimodal ones)."""
    config = unwrap_model(model).config
    for cfg in (config, getattr(config, "text_config", None)):
        for name in ("hidden_size", "n_embd", "d_model"):
            if cfg is not None and isinstance(getattr(cfg, name, None), int):
                return getattr(cfg, name)
    raise ValueError(f"cannot read the hidden size from {type(config).__name__}")


def layer_output(output) -> Tensor:
    """The hidden states in a decoder layer's output: a bare tensor (Qwen3 in transformers 5) or a tuple."""
    return output if isinstance(output, Tensor) else output[0]


def replace_layer_output(output, hidden: Tensor):
    """The layer output with its hidden states replaced, keeping the output's type."""
    if isinstance(output, Tensor):
        return hidden
    return (hidden, *output[1:])


class _LayerHook:
    """A forward hook on one decoder layer: installed when the ``with`` block opens, removed when it exits,
    exceptions included (or by ``remove()``)."""

    def __init__(self, model: nn.Module, layer: int):
        self.module = decoder_layer(model, layer)
        self.layer = layer
        self.enabled = True
        self._handle = None

    def _install(self):
        """Register the hook on ``self.module``; returns its handle."""
        raise NotImplementedError

    def __enter__(self):
        self._handle = self._install()
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


class ResidualCapture(_LayerHook):
    """Records the residual stream after decoder layer ``layer`` on every forward while open.

    During ``generate`` each forward is one chunk: the prefill, then one token per decode step, so
    ``torch.cat(capture.chunks, dim=1)`` is the residual of every prompt and generated position.
    ``on_forward(hidden)`` is called instead of storing when given (e.g. to encode on the fly).
    """

    def __init__(self, model: nn.Module, layer: int, *, detach: bool = True,
                 on_forward: Callable[[Tensor], None] | None = None):
        super().__init__(model, layer)
        self.detach, self.on_forward = detach, on_forward
        self.chunks: list[Tensor] = []

    def _hook(self, module, args, output):
        if not self.enabled:
            return
        hidden = layer_output(output)
        if self.detach:
            hidden = hidden.detach()
        if self.on_forward is not None:
            self.on_forward(hidden)
        else:
            self.chunks.append(hidden)

    def _install(self):
        return self.module.register_forward_hook(self._hook)

    @property
    def last(self) -> Tensor:
        if not self.chunks:
            raise RuntimeError(f"no forward pass went through layer {self.layer} while capturing")
        return self.chunks[-1]

    def concatenated(self) -> Tensor:
        """All captured chunks joined along the sequence dimension, (B, T_total, d)."""
        if not self.chunks:
            raise RuntimeError(f"no forward pass went through layer {self.layer} while capturing")
        return torch.cat(self.chunks, dim=1)

    def clear(self) -> None:
        self.chunks.clear()


class _StopForward(Exception):
    """Raised right after the wanted decoder layer has run: the layers after it are not needed."""


def _raise_stop_forward(module, args, output):
    raise _StopForward


class ForwardToLayer(ResidualCapture):
    """Runs the model only up to decoder layer ``layer``: ``run(**inputs)`` returns the residual at its output,
    (B, T, d), and the later layers never run (discovery, feature statistics and early-exit rollout encoding
    need nothing past the SAE's layer). Both hooks are removed when the ``with`` block exits."""

    def __init__(self, model: nn.Module, layer: int):
        super().__init__(model, layer)
        self.model = model
        self._stop = None

    def _install(self):
        handle = super()._install()
        self._stop = self.module.register_forward_hook(_raise_stop_forward)  # after the capture: it runs second
        return handle

    def remove(self) -> None:
        if self._stop is not None:
            self._stop.remove()
            self._stop = None
        super().remove()

    def run(self, **inputs) -> Tensor:
        self.clear()
        try:
            self.model(**inputs)
        except _StopForward:
            pass
        return self.last


def capture_residual(model: nn.Module, layer: int, **kwargs) -> ResidualCapture:
    """Context manager capturing the residual stream at the output of ``layer``; see ResidualCapture."""
    return ResidualCapture(model, layer, **kwargs)


class ResidualEdit(_LayerHook):
    """Adds ``delta_fn(hidden)`` to the residual stream after ``layer``, on chosen rows and positions.

    ``rows``: batch indices to edit (None = all rows); a forward whose batch lacks one of them raises
    ``IndexError`` (e.g. beam search expands every row into several). ``positions``: token positions to edit (None =
    all); a position is the token's index in its sequence as the model numbers it (``position_ids``,
    which HF generation derives from the attention mask, so left padding does not shift it). When a
    layer gets no ``position_ids``, positions are counted across successive forwards (prefill, then
    one per decode step) from the first forward after entering.
    """

    def __init__(self, model: nn.Module, layer: int, delta_fn: Callable[[Tensor], Tensor], *,
                 rows: Iterable[int] | Tensor | None = None, positions: Iterable[int] | slice | None = None):
        super().__init__(model, layer)
        self.delta_fn = delta_fn
        self.rows = None if rows is None else torch.as_tensor(list(rows) if not isinstance(rows, Tensor)
                                                              else rows, dtype=torch.long)
        self.positions = positions
        self._offset = 0

    def _position_mask(self, hidden: Tensor, position_ids: Tensor | None) -> Tensor | None:
        if self.positions is None:
            return None
        batch, seq = hidden.shape[:2]
        if position_ids is None:
            position_ids = torch.arange(self._offset, self._offset + seq, device=hidden.device)
        position_ids = position_ids.to(hidden.device).expand(batch, seq)
        if isinstance(self.positions, slice):
            start = self.positions.start or 0
            stop = self.positions.stop if self.positions.stop is not None else torch.iinfo(torch.long).max
            return (position_ids >= start) & (position_ids < stop)
        wanted = torch.as_tensor(list(self.positions), device=hidden.device, dtype=position_ids.dtype)
        return torch.isin(position_ids, wanted)

    def _hook(self, module, args, kwargs, output):
        hidden = layer_output(output)
        seq = hidden.shape[1]
        if not self.enabled:
            self._offset += seq
            return None
        delta = self.delta_fn(hidden).to(hidden.dtype)  # (d,) or (B, T, d)
        mask = self._position_mask(hidden, kwargs.get("position_ids"))  # (B, T) or None
        if self.rows is not None:
            outside = self.rows[(self.rows >= hidden.shape[0]) | (self.rows < -hidden.shape[0])]
            if outside.numel():  # a row silently left unsteered would make a steered sample look like a normal one
                raise IndexError(f"ResidualEdit on layer {self.layer}: rows {outside.tolist()} are outside this "
                                 f"forward's batch of {hidden.shape[0]} rows")
            row_mask = torch.zeros(hidden.shape[0], dtype=torch.bool, device=hidden.device)
            row_mask[self.rows.to(hidden.device)] = True
            mask = row_mask[:, None] if mask is None else mask & row_mask[:, None]
        self._offset += seq
        if mask is not None:  # unrestricted edits (the common case) skip the mask: one add per forward
            delta = mask.unsqueeze(-1).to(hidden.dtype) * delta
        return replace_layer_output(output, hidden + delta)

    def _install(self):
        self._offset = 0  # positions without position_ids count from the first forward after entering
        return self.module.register_forward_hook(self._hook, with_kwargs=True)


def add_to_residual(model: nn.Module, layer: int, vector: Tensor, **kwargs) -> ResidualEdit:
    """Context manager adding a fixed vector (d,) to the residual after ``layer``; see ResidualEdit."""
    if vector.ndim != 1 or vector.shape[0] != hidden_size(model):
        raise ValueError(f"steering vector must have shape ({hidden_size(model)},), got {tuple(vector.shape)}")
    return ResidualEdit(model, layer, _ConstantDelta(vector), **kwargs)


class _ConstantDelta:
    def __init__(self, vector: Tensor):
        self.vector = vector.detach()

    def __call__(self, hidden: Tensor) -> Tensor:
        return self.vector.to(hidden.device)

"""Dense steering vectors: the difference in means of the residual stream (DiffMean).

The vector is the mean residual of texts that show a concept minus that of texts that do not, at one layer;
steering adds ``strength * vector`` there at every position. AxBench (Wu et al., 2025) found DiffMean the
strongest representation-steering baseline, ahead of SAE features; contrastive activation addition (Rimsky
et al., 2024) and ActAdd (Turner et al., 2023) steer along the same kind of direction. It is the yardstick for
SAE steering: where it works at a layer and the SAE's features do not, the features are the limit, not the layer.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from qscope_rl.features.text_features import check_texts, layer_batches, pad_id, token_ids
from qscope_rl.hooks import ResidualEdit, add_to_residual, decoder_layer


@torch.no_grad()
def mean_residual(model: nn.Module, tokenizer, texts: Sequence[str], layer: int, *, batch_size: int = 32,
                  max_length: int = 256, what: str = "texts") -> Tensor:
    """(d,) the residual after decoder layer ``layer``, averaged over each text's tokens, then over the texts
    (each text counts once, whatever its length). Texts are truncated to ``max_length`` tokens."""
    texts = check_texts(texts, what)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    decoder_layer(model, layer)  # a clear error for a layer the model does not have, before any forward
    ids = token_ids(tokenizer, texts, max_length, what)
    total = 0
    for _, mask, residual in layer_batches(model, layer, ids, batch_size, pad_id(tokenizer)):
        hidden, m = residual.float(), mask.to(residual.device).unsqueeze(-1)
        total = total + ((hidden * m).sum(1) / m.sum(1)).sum(0)  # (d,) plus this batch's text means
    return total / len(ids)


def diff_mean(model: nn.Module, tokenizer, positive: Sequence[str], negative: Sequence[str], layer: int,
              **kwargs) -> Tensor:
    """(d,) mean residual of ``positive`` texts minus that of ``negative`` ones at ``layer`` (see
    ``mean_residual``): add it to move toward the positive concept, subtract it to move away."""
    return (mean_residual(model, tokenizer, positive, layer, what="positive texts", **kwargs)
            - mean_residual(model, tokenizer, negative, layer, what="negative texts", **kwargs))


def steer_vector(model: nn.Module, vector: Tensor, *, layer: int, strength: float = 1.0,
                 rows: Iterable[int] | Tensor | None = None,
                 positions: Iterable[int] | slice | None = None) -> ResidualEdit:
    """Context manager adding ``strength * vector`` to the residual after ``layer`` (on ``rows`` / ``positions``,
    see ``ResidualEdit``); the hook is removed on exit. Example::

        v = diff_mean(model, tok, chinese_texts, english_texts, layer=14)
        with steer_vector(model, v, layer=14, strength=-1.0):  # away from Chinese
            out = model.generate(**inputs)
    """
    scaled = float(strength) * torch.as_tensor(vector)
    if not bool(torch.isfinite(scaled).all()):
        raise ValueError(f"the steering vector times strength {strength} must be finite: it has NaN or infinite "
                         "entries")
    dtype = next(model.parameters()).dtype
    return add_to_residual(model, layer, scaled.to(dtype), rows=rows, positions=positions)

"""The log-probability of each token HF ``generate`` sampled, read from the logits it computed (no extra forward).

Amplified rollouts need mu, the steered policy's log-probability of what it sampled, for their importance weight
(`amplified_importance.py`). Generation already computed it: the last position of every forward predicts the next
token fed. `SampledLogprobs` hooks the input embedding (it sees the tokens fed) and the output embedding (it sees
the logits), keeps one (rows, V) log-softmax from the previous forward, and gathers it at the token the next
forward feeds; the last sampled token, never fed, is gathered at the end from the completion ids. Memory: one
(rows, V) slice, not (rows, T, V).

Positions are followed by the rule `GenerationCapture` uses (`recomputes_sequence`: KV cache, chunked prefill,
``use_cache=False``), so a prefill chunk's prediction of the next prompt token is dropped. The log-probabilities
are log_softmax(logits / T) at the sampling temperature, what TRL's own per-token log-probabilities and a steered
re-forward give; top-p, top-k and other logits processors are not applied, as TRL does not apply them either.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qscope_rl.hooks import unwrap_model

from .rollout_capture import recomputes_sequence


class SampledLogprobs:
    """Records log mu of the sampled tokens of ``rows`` (local row indices) during one ``generate`` call.

    Use as a context manager around the call, then `completion_logprobs`. ``prompt_width``: the padded prompt
    width TRL feeds (`rollout_capture.padded_width`); ``num_rows``: the rows of the call (a forward of any other
    row count, as beam search runs, makes the record unusable, and `completion_logprobs` says why)."""

    def __init__(self, model: nn.Module, rows: Tensor, prompt_width: int, num_rows: int, temperature: float):
        base = unwrap_model(model)
        self._embed, self._head = base.get_input_embeddings(), base.get_output_embeddings()
        if self._embed is None or self._head is None:
            raise ValueError(f"{type(base).__name__} has no input or output embedding to read sampled tokens from")
        self.rows, self.prompt_width, self.num_rows = rows, prompt_width, num_rows
        self.temperature = float(temperature)
        self.pending: Tensor | None = None  # (rows, V) log-softmax of the last forward's last position
        self.columns: list[Tensor] = []  # log mu of completion tokens 0, 1, ... (each (rows,))
        self.covered = 0
        self.problem = ""
        self._handles = []

    def __enter__(self):
        self._handles = [self._embed.register_forward_pre_hook(self._on_tokens),
                         self._head.register_forward_hook(self._on_logits)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _on_tokens(self, module, args) -> None:
        ids = args[0] if args else None
        if not torch.is_tensor(ids) or ids.dim() != 2:
            self.problem = self.problem or "a forward was fed embeddings, not token ids"
            return
        if ids.shape[0] != self.num_rows:
            self.problem = self.problem or f"a forward of {ids.shape[0]} rows for {self.num_rows} rollouts (beams)"
            return
        length = ids.shape[1]
        recompute = recomputes_sequence(length, self.covered, self.prompt_width)
        first_new, column = (length - 1, ids[:, -1]) if recompute else (self.covered, ids[:, 0])
        if self.pending is not None and first_new >= self.prompt_width:
            if first_new - self.prompt_width != len(self.columns):
                self.problem = self.problem or f"generation fed position {first_new} out of order"
            else:
                token = column[self.rows.to(column.device)].to(self.pending.device)
                self.columns.append(self.pending.gather(1, token[:, None]).squeeze(1))
        self.pending = None
        self.covered = length if recompute else self.covered + length

    @torch.no_grad()
    def _on_logits(self, module, args, output) -> None:
        logits = output if torch.is_tensor(output) else None
        if logits is None or logits.shape[0] != self.num_rows:
            return  # a problem the next forward's tokens, or `completion_logprobs`, will name
        last = logits[self.rows.to(logits.device), -1].float()
        self.pending = torch.log_softmax(last / self.temperature, dim=-1)

    def completion_logprobs(self, completion_ids: Tensor) -> tuple[Tensor | None, str]:
        """((rows, T) log mu of each completion token, "") for the (B, T) right-padded ``completion_ids``, or
        (None, why) when what was recorded does not cover them. Positions past a row's end hold what generation
        fed there (padding): mask them."""
        width = completion_ids.shape[1]
        if self.problem:
            return None, self.problem
        if width == 0 or self.pending is None or len(self.columns) != width - 1:
            return None, (f"generation recorded {len(self.columns) + (self.pending is not None)} sampled tokens for "
                          f"a completion width of {width}: an unknown generation layout")
        last = completion_ids[self.rows.to(completion_ids.device), width - 1].to(self.pending.device)
        columns = [*self.columns, self.pending.gather(1, last[:, None]).squeeze(1)]
        return torch.stack(columns, dim=1), ""

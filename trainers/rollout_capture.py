"""Where the SAE trainers read a rollout's layer-L residual from, and which completion tokens count.

Two paths, one result (tests/test_alignment.py checks both against an unpadded per-row forward):

- ``generation``: a forward hook SAE-encodes the residual while HF ``generate`` samples (no extra forward; only
  the top-k codes are kept, see `GenerationCapture`). What
  one forward holds depends on the generation settings: the prompt, then one token per step (KV cache); the
  prompt in pieces first (``prefill_chunk_size``); or the whole sequence again at every step
  (``use_cache=False``). `GenerationCapture` tells these apart from the shapes it sees and returns the
  completion positions, or None and why (the trainer then falls back to the forward and logs it);
- ``forward``: one no-grad forward over prompt + completion that stops after the SAE layer.

Which settings allow the generation path is decided at construction (`capture_blocker`): vLLM, continuous
batching, tools, a ``rollout_func``, beam search and assisted decoding do not (``sae_capture='auto'`` takes the
forward, ``'generation'`` is refused). `detection_mask` is the one rule, for both paths, of which completion
tokens the SAE signal reads.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from qscope_rl.features.detection import CompletionActivations
from qscope_rl.features.sparse_capture import SparseCapture
from qscope_rl.hooks import unwrap_model


def padded_width(prompt_ids: list[list[int]], multiple: int | None) -> int:
    """The width TRL left-pads the prompts to before `generate` (the longest, rounded up to ``multiple``)."""
    width = max((len(p) for p in prompt_ids), default=0)
    return math.ceil(width / multiple) * multiple if multiple else width


def recomputes_sequence(length: int, covered: int, prompt_width: int) -> bool:
    """Whether a forward of ``length`` positions, after ``covered`` positions fed so far, is ``use_cache=False``
    recomputing the whole sequence (one position longer than everything seen, after the whole prompt): then only
    its last position is new. Any other forward appends its positions (the prompt in one or more pieces, then one
    token per decode step)."""
    return length > 1 and covered >= prompt_width and length == covered + 1


class GenerationCapture:
    """The ``on_forward`` callback of a `ResidualCapture` during ``generate``: follows the positions fed to the
    model so far, in whatever pieces the generation settings feed them, and keeps them in one of two stores.

    A forward that is exactly one position longer than everything seen so far (and comes after the whole prompt)
    is ``use_cache=False`` recomputing the sequence: only its last position is new (so memory stays O(T), not
    O(T^2)). Any other forward appends its positions: the prompt (in one piece or in ``prefill_chunk_size``
    pieces), then one token per decode step.

    Stores (the trainers always use the sparse one; nothing they compute needs the dense residual of a rollout:
    the auxiliary loss reads the training forward's own residual, with its graph):

    - ``sparse`` (a `SparseCapture` whose ``prompt_length`` is the padded prompt width): completion positions
      are SAE-encoded as they arrive, a chunk of decode steps at a time, and only their top-k codes and tracked
      pre-activations are kept (B x T x k); read with `completion_activations`;
    - dense (``sparse=None``): every forward's (B, t, d) residual is kept; read with `completion_residual`.
      The reference the sparse store is tested against (tests/test_capture_parity.py), and for debugging.
    """

    def __init__(self, prompt_width: int, sparse: SparseCapture | None = None):
        self.prompt_width = prompt_width
        self.sparse = sparse
        if sparse is not None and sparse.start != prompt_width:
            raise ValueError(f"the sparse store must start at the prompt width {prompt_width}, not {sparse.start}")
        self.pieces: list[Tensor] = []
        self.covered = 0
        self.rows: set[int] = set()

    def __call__(self, hidden: Tensor) -> None:
        length = hidden.shape[1]
        self.rows.add(hidden.shape[0])
        recompute = recomputes_sequence(length, self.covered, self.prompt_width)
        if self.sparse is not None:
            if len(self.rows) == 1:  # rows changed (beams): the capture no longer fits; `_why_not` says so
                self.sparse.feed(hidden[:, -1:] if recompute else hidden)
        elif recompute:
            self.pieces = [hidden]
        else:
            self.pieces.append(hidden)
        self.covered = length if recompute else self.covered + length

    def _why_not(self, num_rows: int, completion_width: int) -> str:
        """"" when what was fed covers prompt + completion - 1 positions of ``num_rows`` rows, else why not."""
        if not self.rows:
            return "no forward went through the SAE layer during generation"
        if self.rows != {num_rows}:
            return (f"generation ran forwards of {sorted(self.rows)} rows for {num_rows} rollouts (beam search "
                    f"or another row-expanding generation mode)")
        expected = self.prompt_width + completion_width - 1
        if completion_width == 0 or self.covered != expected:
            return (f"generation fed {self.covered} positions through the SAE layer, expected {expected} "
                    f"(prompt {self.prompt_width} + completion {completion_width} - 1): an unknown "
                    f"generation layout")
        return ""

    def completion_residual(self, num_rows: int, completion_width: int) -> tuple[Tensor | None, str]:
        """Dense store: (residual, "") with residual (B, completion_width, d) at completion tokens 0..T-2 (the last
        sampled token is never fed to the model: its column is zero), or (None, why) when the capture does not fit."""
        if self.sparse is not None:
            raise RuntimeError("this capture keeps sparse codes: read them with completion_activations")
        why = self._why_not(num_rows, completion_width)
        if why:
            return None, why
        generated = torch.cat(self.pieces, dim=1)[:, self.prompt_width:]
        return torch.cat([generated, generated.new_zeros(num_rows, 1, generated.shape[-1])], dim=1), ""

    def completion_activations(self, mask: Tensor) -> tuple[CompletionActivations | None, str]:
        """Sparse store: (activations, "") of the (B, T) ``mask``'s completion tokens, as `encode_completions` of
        the dense residual gives them, or (None, why) when the capture does not fit."""
        if self.sparse is None:
            raise RuntimeError("this capture keeps the dense residual: read it with completion_residual")
        why = self._why_not(mask.shape[0], mask.shape[1])
        if why:
            return None, why
        return self.sparse.completion_activations(mask), ""


def detection_mask(completion_ids: list[list[int]], eos_token_ids, tool_mask: list[list[int]] | None = None,
                   device=None) -> Tensor:
    """(B, T) bool over right-padded completions: the tokens the SAE signal reads, the same in both paths.

    Left out: the last sampled token (generation never feeds it to the model: it is the closing EOS or the token
    where ``max_completion_length`` cut the completion, so the forward path leaves it out too); every EOS id
    (an end-of-turn marker is not text: on the demo world the residual there holds the largest "Chinese" score
    of most clean English rollouts); and tool-result tokens (``tool_mask`` 0: the policy never generated them,
    and TRL masks them out of its loss).
    """
    width = max((len(c) for c in completion_ids), default=0)
    ids = torch.full((len(completion_ids), width), -1, dtype=torch.long)
    keep = torch.zeros(len(completion_ids), width, dtype=torch.bool)
    for row, c in enumerate(completion_ids):
        ids[row, :len(c)] = torch.as_tensor(c, dtype=torch.long)
        keep[row, :max(len(c) - 1, 0)] = True
        if tool_mask is not None:
            keep[row, :len(c)] &= torch.as_tensor(tool_mask[row][:len(c)], dtype=torch.long).bool()
    eos = torch.as_tensor([e for e in eos_token_ids if e is not None], dtype=torch.long)
    keep &= ~torch.isin(ids, eos)
    return keep.to(device) if device is not None else keep


def num_beams(trainer) -> int:
    """Beams per rollout in HF generation: TRL's generation config, else the model's own (which fills unset fields)."""
    beams = getattr(getattr(trainer, "generation_config", None), "num_beams", 1) or 1
    if beams == 1:
        beams = getattr(getattr(unwrap_model(trainer.model), "generation_config", None), "num_beams", 1) or 1
    return int(beams)


def steering_blocker(trainer) -> str | None:
    """Why a forward hook cannot steer chosen rollouts while they are sampled (None when it can)."""
    if getattr(trainer, "use_vllm", False) and getattr(trainer, "vllm_mode", None) != "colocate":
        # colocate: the engine runs in this process and `SAEVLLMMixin` hooks it (trainers/vllm_rollouts.py)
        return "vllm_mode='server' generates in another process, out of reach of any hook; use vllm_mode='colocate'"
    if getattr(trainer, "use_transformers_continuous_batching", False):
        return "continuous batching interleaves requests"
    if getattr(trainer, "rollout_func", None) is not None:
        return "a rollout_func generates the rollouts"
    if getattr(trainer, "tools", None):
        return "TRL's tool loop regenerates the rows that called a tool, one sample each"
    return None


def capture_blocker(trainer) -> str | None:
    """Why a forward hook cannot record the residual of every completion token as it is sampled (None when it can)."""
    why = steering_blocker(trainer)
    if why:
        return "tool calls extend completions after generation" if getattr(trainer, "tools", None) else why
    beams = num_beams(trainer)
    if beams > 1:
        return f"beam search (num_beams={beams}) runs {beams} candidate rows per rollout"
    config = getattr(trainer, "generation_config", None)
    if getattr(config, "prompt_lookup_num_tokens", None) or getattr(config, "assistant_model", None) is not None:
        return "assisted decoding feeds candidate tokens that may be rejected"
    return None

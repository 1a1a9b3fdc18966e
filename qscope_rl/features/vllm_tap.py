"""Capture and steer the residual stream inside an in-process vLLM engine, per request.

vLLM runs every scheduled request in one flattened batch: a forward sees ``(num_tokens, d)`` rows, request
after request. `VLLMResidualTap` puts one forward hook on decoder layer L of the engine's model and reads the
model runner's own bookkeeping for that step (request ids, row offsets, tokens already computed, prompt
lengths) to know which rows belong to which request and which position each row is. Only requests that carry
our tag, ``SamplingParams.extra_args["qscope_rl"] = {"row": i, "steer": bool}``, are touched:

- steering adds ``vector`` to every row of a steered request (prompt and generated positions, as the HF path
  does), in place, leaving every other row bit-identical;
- capture keeps the residual stream after layer L (vLLM's layer returns ``(mlp_out, residual)``: their sum)
  of completion positions only, and encodes it through the SAE a chunk at a time into a `SparseCodeStore`
  (the store HF capture uses too: top-k codes only), so no ``(tokens, d)`` buffer outlives a chunk.
  Completion token t of a request is position ``prompt_len + t``; the last sampled token is never fed back,
  so it has no residual (as under HF generate).

Prefix caching (vLLM's default, on under TRL) shares prompt KV blocks between requests with the same prompt.
A steered request's prompt KV is steered, so `tagged_requests` gives steered requests a ``cache_salt``:
their blocks are never shared with unsteered requests (which stay bit-identical and keep their cache hits),
and their prefill is really steered (it is recomputed, not read from an unsteered cache). Capture needs no
such care: completion positions are always computed per request.

Python hooks only fire when vLLM runs the model eagerly (``enforce_eager=True``): compiled models (inductor,
CUDA graphs) never call them, so the tap refuses a compiled engine rather than silently doing nothing.
Only in-process engines can be reached (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, which TRL's colocate mode gets
through vLLM's ``external_launcher`` backend); a vLLM server is another process.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from qscope_rl.hooks import decoder_layer
from qscope_rl.sae.autoencoder import SparseAutoencoder

from .code_store import SparseCodeStore
from .detection import CompletionActivations

TAG = "qscope_rl"


def model_runner(llm):
    """The model runner of an in-process vLLM `LLM` (where the torch model and the step's bookkeeping live)."""
    try:
        return llm.llm_engine.model_executor.driver_worker.model_runner
    except AttributeError as error:
        raise RuntimeError(
            "cannot reach the vLLM model in this process: the engine runs in another process. Hooks need an "
            "in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0, set by vLLM for distributed_executor_backend="
            "'external_launcher', which TRL's vllm_mode='colocate' uses); a vLLM server cannot be hooked"
        ) from error


def require_eager(llm) -> None:
    """Refuse an engine that compiled its model: a Python forward hook would never fire there."""
    if not llm.llm_engine.vllm_config.model_config.enforce_eager:
        raise RuntimeError(
            "this vLLM engine compiled its model (enforce_eager=False: torch.compile and/or CUDA graphs), so a "
            "forward hook would never fire. Build the LLM with enforce_eager=True (the SAE trainers do so in "
            "vllm_mode='colocate' when they capture or steer)"
        )


def prefix_caching(llm) -> bool:
    return bool(llm.llm_engine.vllm_config.cache_config.enable_prefix_caching)


def request_tag(row: int, steer: bool) -> dict:
    """The ``extra_args`` entry that marks a request for the tap: its row, and whether to steer it."""
    return {TAG: {"row": int(row), "steer": bool(steer)}}


@dataclass
class CapturedCompletions:
    """Sparse SAE activations of the completion tokens the tap saw, in a `SparseCodeStore`: the codes of tag row
    r's completion token t sit at cell (``slot_of_row[r]``, t)."""

    store: SparseCodeStore
    slot_of_row: dict[int, int]
    tracked_ids: Tensor | None
    d_sae: int

    @classmethod
    def from_entries(cls, rows: Tensor, offsets: Tensor, values: Tensor, indices: Tensor, pre: Tensor | None,
                     tracked_ids: Tensor | None, d_sae: int) -> CapturedCompletions:
        """From flat entries (N,) rows / offsets, (N, k) codes, (N, f) pre: how a tap records them, any order;
        an entry repeated later (a request recomputed after preemption) replaces the earlier one."""
        slot_of_row: dict[int, int] = {}
        slots = torch.tensor([slot_of_row.setdefault(int(r), len(slot_of_row)) for r in rows.tolist()],
                             dtype=torch.long)
        store = SparseCodeStore(d_sae=d_sae, width=values.shape[-1], value_dtype=values.dtype, device=values.device,
                                tracked=0 if pre is None else pre.shape[-1])
        store.write(slots, offsets, values, indices, pre)
        return cls(store, slot_of_row, tracked_ids, d_sae)

    def completion_activations(self, rows: list[int], text_lengths: list[int], width: int,
                               mask: Tensor | None = None) -> CompletionActivations:
        """Activations laid out as TRL lays out ``completion_ids``: row b of the result is tag row ``rows[b]``,
        position t is completion token t; the mask is True where a residual was captured, t < text length and
        the optional (B, width) ``mask`` holds (codes off the mask are zero, as `encode_completions` leaves them)."""
        device = self.store.device
        slots = torch.tensor([self.slot_of_row.get(int(r), -1) for r in rows], dtype=torch.long)
        lengths = torch.tensor(list(text_lengths), dtype=torch.long, device=device)
        keep = torch.arange(width, device=device)[None, :] < lengths[:, None]
        if mask is not None:
            keep &= mask.to(device=device, dtype=torch.bool)
        values, indices, pre, written = self.store.grid(slots, 0, width, keep)
        return CompletionActivations(values, indices, written & keep, pre, self.tracked_ids, self.d_sae)


class VLLMResidualTap:
    """A forward hook on decoder layer ``layer`` of an in-process, eager vLLM engine; see the module docstring.

    ``sae``: encode completion tokens (None: no capture); ``steer_vector``: the (d,) vector added to steered
    requests (None: no steering). Use as ``with tap.session(): llm.generate(...)``; the hook is installed for
    the session only and removed on every exit path; ``session.captured`` holds what it saw.
    """

    def __init__(self, llm, layer: int, *, sae: SparseAutoencoder | None = None, steer_vector: Tensor | None = None,
                 tracked_ids: Tensor | None = None, chunk_tokens: int | None = None, capacity: int = 0):
        self.llm, self.runner = llm, model_runner(llm)
        require_eager(llm)
        self.layer = layer
        self.module = decoder_layer(self.runner.model, layer)
        d = int(self.runner.model_config.get_hidden_size())
        if sae is not None and sae.d_in != d:
            raise ValueError(f"the SAE has d_in={sae.d_in} but the vLLM model's hidden size is {d}")
        if steer_vector is not None and tuple(steer_vector.shape) != (d,):
            raise ValueError(f"steering vector must have shape ({d},), got {tuple(steer_vector.shape)}")
        self.sae, self.tracked_ids = sae, tracked_ids
        self.chunk_tokens = chunk_tokens or (sae.memory_bounded_chunk() if sae is not None else 0)
        self.steer_vector = None if steer_vector is None else steer_vector.detach()
        self.salt = None
        if self.steer_vector is not None:
            digest = hashlib.sha256(self.steer_vector.float().cpu().numpy().tobytes()).hexdigest()[:16]
            self.salt = f"qscope-rl-steer-{digest}"
        self._handle = None
        self._tags: dict[str, tuple[int, bool] | None] = {}
        self._pending: list[tuple[Tensor, np.ndarray, np.ndarray]] = []
        self._pending_tokens = 0
        self.capacity = max(int(capacity), 0)  # completion tokens per request to preallocate the code grid for
        self._store: SparseCodeStore | None = None
        self._slots: dict[int, int] = {}  # tag row -> slot in the store, given as rows are first encoded

    # -- per request ---------------------------------------------------------------------------------

    def _tag(self, req_id: str) -> tuple[int, bool] | None:
        if req_id not in self._tags:
            state = self.runner.requests.get(req_id)
            extra = getattr(getattr(state, "sampling_params", None), "extra_args", None) or {}
            tag = extra.get(TAG)
            self._tags[req_id] = None if tag is None else (int(tag["row"]), bool(tag.get("steer", False)))
        return self._tags[req_id]

    def _layout(self):
        """This step's tagged requests: (tag row, steer, first row, token count, first position, prompt length)."""
        batch = self.runner.input_batch
        n = batch.num_reqs
        starts = self.runner.query_start_loc.np[: n + 1]
        computed = batch.num_computed_tokens_cpu[:n]
        prompt_lens = batch.num_prompt_tokens[:n]
        for i, req_id in enumerate(batch.req_ids[:n]):
            tag = self._tag(req_id) if req_id is not None else None
            count = int(starts[i + 1] - starts[i])
            if tag is not None and count > 0:
                yield tag[0], tag[1], int(starts[i]), count, int(computed[i]), int(prompt_lens[i])

    # -- the hook ------------------------------------------------------------------------------------

    def _hook(self, module, args, output):
        hidden, residual = (output if isinstance(output, tuple) else (output, None))[:2]
        steer_rows, capture_rows, capture_req, capture_off = [], [], [], []
        for row, steer, first, count, position, prompt_len in self._layout():
            if steer and self.steer_vector is not None:
                steer_rows.append(np.arange(first, first + count))
            if self.sae is not None:
                positions = np.arange(position, position + count)
                completion = positions >= prompt_len
                if completion.any():
                    capture_rows.append(np.arange(first, first + count)[completion])
                    capture_req.append(np.full(int(completion.sum()), row))
                    capture_off.append(positions[completion] - prompt_len)
        if steer_rows:
            rows = torch.from_numpy(np.concatenate(steer_rows)).to(hidden.device)
            vector = self.steer_vector.to(device=hidden.device, dtype=hidden.dtype)
            hidden.index_add_(0, rows, vector.expand(len(rows), -1))  # the untagged rows are never written
        if capture_rows:
            rows = torch.from_numpy(np.concatenate(capture_rows)).to(hidden.device)
            stream = hidden.index_select(0, rows)
            if residual is not None:
                stream = stream + residual.index_select(0, rows)  # vLLM defers the residual add to the next norm
            self._pending.append((stream, np.concatenate(capture_req), np.concatenate(capture_off)))
            self._pending_tokens += len(rows)
            if self._pending_tokens >= self.chunk_tokens:
                self._encode_pending()
        return output

    def _encode_pending(self) -> None:
        if not self._pending:
            return
        flat = torch.cat([p[0] for p in self._pending])
        rows = np.concatenate([p[1] for p in self._pending])
        offsets = np.concatenate([p[2] for p in self._pending])
        self._pending, self._pending_tokens = [], 0
        with torch.no_grad():
            flat = flat.to(self.sae.W_enc.device)
            if self.tracked_ids is None:
                acts, pre = self.sae.encode_sparse(flat, chunk_tokens=self.chunk_tokens), None
            else:
                acts, pre = self.sae.encode_sparse_tracked(flat, self.tracked_ids, chunk_tokens=self.chunk_tokens)
        unique, inverse = np.unique(rows, return_inverse=True)
        slot_of = np.array([self._slots.setdefault(int(r), len(self._slots)) for r in unique], dtype=np.int64)
        if self._store is None:
            self._store = self._new_store(acts.values.shape[-1])
        self._store.write(torch.from_numpy(slot_of[inverse]), torch.from_numpy(offsets), acts.values, acts.indices,
                          pre)

    def _new_store(self, width: int) -> SparseCodeStore:
        tracked = 0 if self.tracked_ids is None else len(self.tracked_ids)
        return SparseCodeStore(d_sae=self.sae.d_sae, width=width, value_dtype=self.sae.W_enc.dtype,
                               device=self.sae.W_enc.device, tracked=tracked, capacity=self.capacity)

    # -- sessions ------------------------------------------------------------------------------------

    @contextmanager
    def session(self):
        """Install the hook for one generation call; yields self, whose `captured()` is ready after the block."""
        self._tags.clear()
        self._pending, self._pending_tokens, self._store, self._slots = [], 0, None, {}
        self._handle = self.module.register_forward_hook(self._hook)
        try:
            yield self
        finally:
            self._handle.remove()
            self._handle = None
            self._tags.clear()

    def captured(self) -> CapturedCompletions:
        """What the last session captured, sparse-encoded (the remainder of the last chunk is encoded now)."""
        if self.sae is None:
            raise RuntimeError("this tap has no SAE: it steers only")
        self._encode_pending()
        store, slots = self._store or self._new_store(self.sae.k or 1), self._slots
        self._store, self._slots = None, {}
        return CapturedCompletions(store, slots, self.tracked_ids, self.sae.d_sae)


@contextmanager
def tagged_requests(llm, steered, *, row_offset: int = 0, salt: str | None = None):
    """Make ``llm.generate`` tag request j with row ``row_offset + j`` and ``steer=steered(row)``, for the block.

    ``steered``: a callable row -> bool. Steered requests also get ``cache_salt=salt`` when prefix caching is
    on (see the module docstring). The instance attribute shadows the class method and is deleted on exit.
    """
    original = llm.generate
    use_salt = salt is not None and prefix_caching(llm)

    def generate(prompts, sampling_params=None, *args, **kwargs):
        single = not isinstance(prompts, (list, tuple))
        prompts = [prompts] if single else list(prompts)
        if sampling_params is None:
            sampling_params = llm.get_default_sampling_params()
        params = sampling_params if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(prompts)
        tagged_prompts, tagged_params = [], []
        for j, (prompt, param) in enumerate(zip(prompts, params)):
            steer = bool(steered(row_offset + j))
            param = param.clone()
            param.extra_args = {**(param.extra_args or {}), **request_tag(row_offset + j, steer)}
            if steer and use_salt:
                prompt = {"prompt": prompt} if isinstance(prompt, str) else dict(prompt)
                prompt["cache_salt"] = salt
            tagged_prompts.append(prompt)
            tagged_params.append(param)
        return original(tagged_prompts, tagged_params, *args, **kwargs)

    llm.generate = generate
    try:
        yield
    finally:
        del llm.generate

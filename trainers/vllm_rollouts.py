"""vLLM colocate for the SAE trainers: capture and amplified sampling inside TRL's in-process vLLM engine.

`SAEVLLMMixin` sits before `SAETrainerMixin` in the SAE trainers' bases and changes nothing unless
``use_vllm=True``. In ``vllm_mode="colocate"`` the engine runs in the trainer's process, so a
`qscope_rl.features.vllm_tap.VLLMResidualTap` on decoder layer L of vLLM's model does what the forward hooks do under
HF generate:

- ``sae_capture="generation"`` (or "auto") encodes each completion's layer-L residual while vLLM generates it,
  a chunk at a time, aligned to TRL's ``completion_ids``: no extra forward, as under HF;
- ``amplify_pack`` adds ``alpha * d`` to the m chosen rollouts of every group, by request (a tag in
  ``SamplingParams.extra_args``), at every prompt and generated position; the other requests' rows are never
  written. Under prefix caching the steered requests get their own ``cache_salt``, so their prefill is steered
  and no other request reads their KV (they lose their prompt cache hits: m of every G prompts are recomputed).

Eager mode: a Python hook never fires in a compiled vLLM model, and TRL 1.16 builds its engine with
``LLM(...)`` and no way to pass ``enforce_eager`` (`trl.GRPOConfig` has no such field). So while TRL builds
the engine, `eager_vllm_engine` wraps the ``LLM`` name TRL's `trl.generation.vllm_generation` module calls,
adding ``enforce_eager=True``, and only when a hook is needed (capture during generation or amplification);
with ``sae_capture="forward"`` and no amplification the engine is left as TRL builds it. The override checks
the TRL version it was written against and fails loudly on another. Its cost on GPU: no CUDA graphs for
decoding (see the README).

``vllm_mode="server"`` generates in another process, out of reach of any hook: amplification and
``sae_capture="generation"`` are refused there, and "auto" falls back to one no-grad forward per batch.

Weight sync: the tap adds no parameter, buffer or module to vLLM's model (a hook only, installed during
generation), so TRL's ``load_weights`` sync sees the model it expects.
"""

from __future__ import annotations

from contextlib import contextmanager

from qscope_rl.features.vllm_tap import VLLMResidualTap, tagged_requests

from .rollout_capture import detection_mask

TRL_WITH_LLM_CALL = "1.16."  # the TRL minor whose VLLMGeneration._init_vllm builds `LLM(...)` as wrapped below


def vllm_hooks_needed(args, tools=None) -> bool:
    """Whether this config needs hooks inside TRL's colocated vLLM engine (capture during generation, or
    amplified sampling)."""
    if args is None or not getattr(args, "use_vllm", False) or getattr(args, "vllm_mode", None) != "colocate":
        return False
    if getattr(args, "sae_source", None) is None:
        return False
    capture = getattr(args, "sae_capture", "auto") in ("auto", "generation") and not tools
    return capture or getattr(args, "amplify_pack", None) is not None


@contextmanager
def eager_vllm_engine():
    """While open, TRL's colocate engine is built with ``enforce_eager=True`` (see the module docstring)."""
    import trl
    from trl.generation import vllm_generation

    original = getattr(vllm_generation, "LLM", None)
    if not trl.__version__.startswith(TRL_WITH_LLM_CALL) or original is None:
        raise RuntimeError(
            f"the SAE trainers put vLLM in eager mode by wrapping trl.generation.vllm_generation.LLM, written "
            f"for TRL {TRL_WITH_LLM_CALL}x; this is TRL {trl.__version__}. Check how that TRL builds its colocate "
            f"engine, or use sae_capture='forward' without amplify_pack"
        )

    def build_eager(*args, **kwargs):
        kwargs["enforce_eager"] = True
        return original(*args, **kwargs)

    vllm_generation.LLM = build_eager
    try:
        yield
    finally:
        vllm_generation.LLM = original


class SAEVLLMMixin:
    """The vLLM colocate branch of the SAE trainers' generation hooks; see the module docstring."""

    _vllm_tap = None
    _vllm_captured = None

    def __init__(self, *args, **kwargs):
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        if vllm_hooks_needed(config, kwargs.get("tools")):
            with eager_vllm_engine():
                super().__init__(*args, **kwargs)
        else:
            super().__init__(*args, **kwargs)

    def _init_sae(self) -> None:
        super()._init_sae()
        if self.sae is None or not self._uses_vllm_tap():
            return
        capture = self._capture_mode == "generation"
        self._vllm_tap = VLLMResidualTap(
            self.vllm_generation.llm, self.sae_layer, sae=self.sae if capture else None,
            steer_vector=self._amplify_vector, tracked_ids=self._tracked_ids if capture else None,
            chunk_tokens=self.sae.memory_bounded_chunk(),
            capacity=self._completion_capacity())

    def _uses_vllm_tap(self) -> bool:
        if not (getattr(self, "use_vllm", False) and self.vllm_mode == "colocate"):
            return False
        return self._capture_mode == "generation" or self._amplify_vector is not None

    @contextmanager
    def _rollout_hooks(self, prompt_ids: list[list[int]]):
        if self._vllm_tap is None:
            with super()._rollout_hooks(prompt_ids):
                yield
            return
        self._turns += 1
        self._captured = self._vllm_captured = None
        if self._turns > 1:  # TRL's tool loop: those rows are encoded by the forward (amplification is refused)
            yield
            return
        steering = self._amplified is not None and bool(self._amplified.any())
        # Tag request j of the engine's call with its global row. TRL's colocate engine gets this process's
        # prompts, or those of its whole tensor-parallel group in rank order: row 0 is the group's first rank's.
        num_rows = len(prompt_ids)
        tp = getattr(self.vllm_generation, "tensor_parallel_size", 1)
        row_offset = (self.accelerator.process_index // tp) * tp * num_rows
        m, groups = self.args.amplify_num_rollouts, self.num_generations
        steered = (lambda row: row % groups < m) if steering else (lambda row: False)
        tap = self._vllm_tap
        with tap.session(), tagged_requests(self.vllm_generation.llm, steered, row_offset=row_offset, salt=tap.salt):
            yield
        if tap.sae is not None:
            self._vllm_captured = tap.captured()

    def _encode_rollouts(self, prompt_ids, completion_ids, tool_mask=None):
        captured, self._vllm_captured = self._vllm_captured, None
        if captured is None:
            return super()._encode_rollouts(prompt_ids, completion_ids, tool_mask)
        first = self.accelerator.process_index * len(completion_ids)
        rows = list(range(first, first + len(completion_ids)))
        width = max((len(c) for c in completion_ids), default=0)
        # One rule for which tokens count, as under HF generation and the forward (`detection_mask`).
        counted = detection_mask(completion_ids, self._eos_token_ids(), tool_mask)
        acts = captured.completion_activations(rows, [len(c) for c in completion_ids], width, mask=counted)
        self.sae_capture_path = "generation"
        self._metrics["train" if self.model.training else "eval"]["sae/capture_forward"].append(0.0)
        return acts

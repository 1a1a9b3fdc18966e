"""The SAE machinery shared by the SAE trainers: load, encode rollouts, amplify, auxiliary loss, metrics.

A trainer lists this mixin before its TRL parent, calls `_init_sae()` at the end of `__init__`, and wraps
its parent's `_generate_single_turn` in `_rollout_hooks(...)` (the one method whose signature differs
between GRPO and RLOO). The mixin overrides these TRL methods, each deferring to the parent when no SAE
is configured:

- `_generate`: encodes the rollouts once per generation batch (sparse), from the top-k codes captured during
  generation (encoded a chunk of decode steps at a time: memory B x T x k, never B x T x d) or from one
  no-grad forward that stops after the SAE layer (`rollout_capture` says which settings take which path, and
  which completion tokens count); amplified rows are chosen per call;
- `_calculate_rewards`: reward functions also receive ``sae_activations`` (one `CompletionActivations`
  per completion, aligned to its tokens, read from the UNSTEERED residual in both paths) and
  ``sae_amplified``; `sae/*` metrics are logged (`SAEMetricsMixin`);
- `_generate_and_score_completions`: amplified rows' importance weights, and TRL's vLLM sampler correction
  kept off them (`AmplifiedImportanceMixin`);
- `_compute_loss`: adds the SASFT / suppression term from a hook on the training forward (and, in
  `AmplifiedImportanceMixin`, weighs amplified rows' advantages with the training forward's pi);
- `_save_checkpoint` / `train` (from `SAECheckpointMixin`): the SAE's source, layer and packs are saved
  beside each checkpoint and checked on resume.

The SAE is an attribute of the trainer, not a submodule of the model: it is never saved with the model,
never trained, and never partitioned by ZeRO.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch
from torch import Tensor
from transformers import TrainerCallback
from transformers.utils import logging
from trl.distributed import DistributedBackend
from trl.models import unwrap_model_for_generation

from qscope_rl.features.aux_loss import FeatureAuxLoss
from qscope_rl.features.classifier import FeatureClassifier
from qscope_rl.features.detection import encode_completions
from qscope_rl.features.feature_pack import FeaturePack
from qscope_rl.features.probe import completion_probe_tail
from qscope_rl.features.sparse_capture import SparseCapture
from qscope_rl.hooks import ForwardToLayer, add_to_residual, capture_residual, decoder_layer, hidden_size
from qscope_rl.sae.loaders import load_sae

from .amplified_importance import AmplifiedImportanceMixin
from .checkpoint import SAECheckpointMixin
from .feature_table import FeatureTableMixin
from .rollout_capture import (
    GenerationCapture,
    capture_blocker,
    detection_mask,
    num_beams,
    padded_width,
    steering_blocker,
)
from .sae_metrics import SAEMetricsMixin
from .sampled_logprobs import SampledLogprobs

logger = logging.get_logger(__name__)


class SAETrainerMixin(AmplifiedImportanceMixin, FeatureTableMixin, SAEMetricsMixin, SAECheckpointMixin):
    _sae_pack_fields = ("code_switch_pack", "repetition_pack", "aux_loss_pack", "amplify_pack")
    # Defaults that make every SAE step a no-op until `_init_sae` loads an SAE.
    sae = None
    aux_loss = None
    sae_layer = None
    _captured = None
    _sampled_logprobs = None  # the last HF generation's record of log mu on amplified rows
    _rollout_acts = None
    _amplified = None
    _rewards_per_func = None
    _amplify_vector = None
    _rollout_completion_ids = None  # decoded for the top-features table
    _turns = 0
    sae_capture_path = None  # "generation" or "forward": where the last batch's residual came from
    # What HF-generation capture keeps: "sparse" (the top-k codes, encoded as rollouts are sampled: B x T x k) or
    # "dense" (every step's residual, encoded after generation: B x T x d; the reference the sparse store is
    # tested against). Nothing the trainers compute needs the dense residual of a rollout.
    generation_capture_store = "sparse"

    # -- set-up ---------------------------------------------------------------------------------------

    def _init_sae(self) -> None:
        args = self.args
        if args.sae_source is None:
            return
        if args.sae_layer is not None:
            decoder_layer(self.model, args.sae_layer)  # a clear error if the policy has no such layer
        dtype = getattr(torch, args.sae_dtype) if args.sae_dtype else None
        sae = load_sae(args.sae_source, args.sae_layer, sae_id=args.sae_id, k=args.sae_k,
                       device=self.accelerator.device, dtype=dtype)
        self.sae_layer = sae.layer if args.sae_layer is None else args.sae_layer
        if self.sae_layer is None:
            raise ValueError(f"the SAE {args.sae_source} does not say which layer it reads: set sae_layer")
        decoder_layer(self.model, self.sae_layer)  # a clear error if the policy has no such layer
        if sae.d_in != hidden_size(self.model):
            raise ValueError(f"the SAE {args.sae_source} has d_in={sae.d_in}, but the policy's hidden size is "
                             f"{hidden_size(self.model)}: it was trained on another model")
        self.sae = sae
        self.code_switch_pack = self._load_pack(args.code_switch_pack)
        self.repetition_pack = self._load_pack(args.repetition_pack)
        self.repetition_probe = None
        if args.repetition_probe is not None:
            self.repetition_probe = FeatureClassifier.load(args.repetition_probe, sae=sae)
            completion_probe_tail(self.repetition_probe)
        for func in self.reward_funcs:
            if getattr(func, "feature_pack", None) is not None:
                func.feature_pack.check_compatible(sae, layer=self.sae_layer)
            if getattr(func, "probe", None) is not None:
                func.probe.check_sae(sae)
            wrapped = func  # a reward that is also a callback (RewardHackingGuard), maybe wrapped, can stop training
            while wrapped is not None:
                if isinstance(wrapped, TrainerCallback) and wrapped not in self.callback_handler.callbacks:
                    self.add_callback(wrapped)
                wrapped = getattr(wrapped, "reward", None)

        tracked = [p.ids for p in (self.code_switch_pack,) if p is not None]
        tracked += [f.feature_pack.ids for f in self.reward_funcs if getattr(f, "feature_pack", None) is not None]
        self.aux_loss = None
        if args.aux_loss_weight > 0:
            pack = self._load_pack(args.aux_loss_pack) if args.aux_loss_pack else self.code_switch_pack
            alphas = pack.alphas if args.aux_loss_use_alpha else None
            self.aux_loss = FeatureAuxLoss(sae, pack.ids, alphas, weight=args.aux_loss_weight)
            tracked.append(pack.ids)
        self._tracked_ids = torch.unique(torch.cat(tracked)) if tracked else None

        self._amplify_vector = None
        if args.amplify_pack is not None:
            pack = self._load_pack(args.amplify_pack).top(args.amplify_top_n)
            self.amplify_features = pack.ids.tolist()
            self._amplify_vector = args.amplify_alpha * sae.W_dec[:, pack.ids.to(sae.W_dec.device)].sum(-1)
        self._capture_mode = self._resolve_capture_mode()

    def _load_pack(self, path: str | None) -> FeaturePack | None:
        if path is None:
            return None
        pack = FeaturePack.load(path)
        pack.check_compatible(self.sae, layer=self.sae_layer)
        return pack

    def _resolve_capture_mode(self) -> str:
        steer_blocked = steering_blocker(self)
        if self._amplify_vector is not None and steer_blocked:
            raise ValueError(f"amplified sampling steers generation with a forward hook, which cannot reach these "
                             f"rollouts ({steer_blocked}); use plain HF generation (use_vllm=False, no tools, no "
                             f"rollout_func) or drop amplify_pack")
        why = capture_blocker(self)
        mode = self.args.sae_capture
        if mode == "generation" and why:
            raise ValueError(f"sae_capture='generation' is impossible here ({why}); use 'forward' or 'auto'")
        if mode == "auto":
            mode = "forward" if why else "generation"
        if mode == "forward" and getattr(self, "_is_vlm", False):
            chosen = f" ('auto' chose it: {why})" if why and self.args.sae_capture == "auto" else ""
            raise ValueError(f"sae_capture='forward'{chosen} cannot encode a VLM's rollouts: the early-exit forward "
                             f"feeds token ids only, so image placeholders would be embedded as text; use "
                             f"sae_capture='generation' with plain HF generation (no vLLM, tools or beam search)")
        logger.info(f"SAE rollouts are encoded from the {mode} path" + (f" ({why})" if why else ""))
        return mode

    def _eos_token_ids(self) -> list[int]:
        """Every id TRL stops generation on (Qwen3 instruct has two); a processor's tokenizer's for VLMs."""
        ids = getattr(self, "eos_token_ids", None)
        if ids is None:
            tokenizer = getattr(self, "_tokenizer", None) or getattr(self.processing_class, "tokenizer",
                                                                      self.processing_class)
            ids = [getattr(tokenizer, "eos_token_id", None)]
        return [int(i) for i in ids if i is not None]

    # -- generation -----------------------------------------------------------------------------------

    def _amplified_rows(self, num_rows: int) -> Tensor:
        """Rows steered in this process: the first m of every group, by global row index (none in eval)."""
        if self._amplify_vector is None or not self.model.training:
            return torch.zeros(num_rows, dtype=torch.bool)
        first = self.accelerator.process_index * num_rows
        global_index = torch.arange(first, first + num_rows)
        return (global_index % self.num_generations) < self.args.amplify_num_rollouts

    @contextmanager
    def _rollout_hooks(self, prompt_ids: list[list[int]]):
        """Around the first `_generate_single_turn` of a `_generate` call: capture the unsteered residual, steer
        every beam of the amplified rows, and record the steered log-probability of what they sample (mu). TRL's
        tool loop calls it again for the rows that made a tool call (their completions are encoded by the forward,
        and amplification is refused with tools): no hooks there."""
        self._turns += 1
        if self._turns > 1 or self._amplified is None or len(self._amplified) != len(prompt_ids):
            yield
            return
        with ExitStack() as stack:
            capture = sampled = None
            width = padded_width(prompt_ids, getattr(self, "pad_to_multiple_of", None))
            if self._capture_mode == "generation":
                capture = self._generation_capture(width)
                stack.enter_context(capture_residual(self.model_wrapped, self.sae_layer, on_forward=capture))
            rows = self._amplified.nonzero().flatten()
            if len(rows):  # registered after the capture: hooks run in order, so the capture reads h, not h + alpha d
                beams = num_beams(self)
                steered = (rows[:, None] * beams + torch.arange(beams)).flatten()  # generate repeats rows per beam
                stack.enter_context(add_to_residual(self.model_wrapped, self.sae_layer, self._amplify_vector,
                                                    rows=steered))
                if self._mu_from_generation():  # the importance weight's mu, from the logits generation computes
                    sampled = stack.enter_context(SampledLogprobs(self.model_wrapped, rows, width, len(prompt_ids),
                                                                  self.temperature))
            yield
            self._captured, self._sampled_logprobs = capture, sampled

    def _generation_capture(self, prompt_width: int) -> GenerationCapture:
        """The capture of one HF generation call, in the store `generation_capture_store` names."""
        if self.generation_capture_store == "dense":
            return GenerationCapture(prompt_width)
        if self.generation_capture_store != "sparse":
            raise ValueError(f"generation_capture_store={self.generation_capture_store!r}: expected 'sparse' or "
                             f"'dense'")
        return GenerationCapture(prompt_width, SparseCapture(
            self.sae, tracked_ids=self._tracked_ids, prompt_length=prompt_width,
            chunk_tokens=self.sae.memory_bounded_chunk(), capacity=self._completion_capacity()))

    def _completion_capacity(self) -> int:
        """Completion positions a capture store preallocates for (it grows past them)."""
        return getattr(self, "max_completion_length", None) or self.args.max_completion_length or 0

    def _encode_rollouts(self, prompt_ids: list[list[int]], completion_ids: list[list[int]], tool_mask=None):
        """Sparse SAE activations of every completion token, aligned to `completion_ids` (see `detection_mask`)."""
        device = self.accelerator.device
        mask = detection_mask(completion_ids, self._eos_token_ids(), tool_mask, device=device)
        capture, self._captured = self._captured, None
        acts = hidden = None
        if capture is not None:
            if capture.sparse is not None:
                acts, why = capture.completion_activations(mask)
            else:
                hidden, why = capture.completion_residual(len(completion_ids), mask.shape[1])
            del capture  # its store: the codes are in `acts` now
            if acts is None and hidden is None and getattr(self, "_is_vlm", False):
                raise RuntimeError(f"cannot align the residual captured during generation ({why}), and a VLM's "
                                   f"rollouts cannot be re-encoded by the text-only forward")
            if acts is None and hidden is None:
                logger.warning_once(f"SAE rollouts: the residual captured during generation does not fit ({why}); "
                                    f"encoding them with the early-exit forward instead")
        self.sae_capture_path = "forward" if acts is None and hidden is None else "generation"
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["sae/capture_forward"].append(float(self.sae_capture_path == "forward"))
        if acts is not None:
            return acts
        if hidden is None:
            hidden = self._forward_to_sae_layer(prompt_ids, completion_ids)
        return encode_completions(self.sae, hidden, mask.to(hidden.device), tracked_ids=self._tracked_ids,
                                  chunk_tokens=self.sae.memory_bounded_chunk())

    @torch.no_grad()
    def _forward_to_sae_layer(self, prompt_ids, completion_ids) -> Tensor:
        """One no-grad forward over prompt + completion that stops after the SAE layer; (B, T_c, d)."""
        device = self.accelerator.device
        pad_id = getattr(getattr(self, "_tokenizer", self.processing_class), "pad_token_id", None) or 0
        prompt_len = max(len(p) for p in prompt_ids)
        width = max((len(c) for c in completion_ids), default=0)
        rows, masks = [], []
        for p, c in zip(prompt_ids, completion_ids):
            left, right = prompt_len - len(p), width - len(c)
            rows.append([pad_id] * left + list(p) + list(c) + [pad_id] * right)
            masks.append([0] * left + [1] * (len(p) + len(c)) + [0] * right)
        input_ids = torch.tensor(rows, device=device)
        attention_mask = torch.tensor(masks, device=device)
        # Number positions as generation does (from the mask), so left padding does not shift them.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        chunk = max(self.args.per_device_train_batch_size, 1)
        outputs = []
        # An exception raised out of an engine's forward skips its end-of-forward hooks (ZeRO-3 parameter release
        # and trace reset, FSDP resharding). Like TRL's generation, run the unwrapped module (ZeRO-3: gathered, its
        # hooks removed) and stop early there; where the engine's hooks stay on, run the forward to its end.
        dist = DistributedBackend(self.accelerator)
        gather = getattr(self.args, "ds3_gather_for_generation", True)
        early_exit = not dist.is_fsdp and not (dist.is_zero3 and not gather)
        checkpointing = self.args.gradient_checkpointing_kwargs
        with unwrap_model_for_generation(self.model_wrapped, self.accelerator, gather_deepspeed3_params=gather,
                                         gradient_checkpointing_kwargs=checkpointing) as model:
            hook = ForwardToLayer(model, self.sae_layer) if early_exit else capture_residual(model, self.sae_layer)
            with hook:
                for start in range(0, len(rows), chunk):
                    sl = slice(start, start + chunk)
                    inputs = dict(input_ids=input_ids[sl], attention_mask=attention_mask[sl],
                                  position_ids=position_ids[sl], use_cache=False)
                    if early_exit:
                        residual = hook.run(**inputs)
                    else:
                        hook.clear()
                        model(**inputs)
                        residual = hook.last
                    outputs.append(residual[:, prompt_len:])
        return torch.cat(outputs) if outputs else torch.zeros(0, width, hidden_size(self.model), device=device)

    # -- rewards ----------------------------------------------------------------------------------------

    @contextmanager
    def _with_sae_reward_kwargs(self, inputs: list[dict]):
        """Expose per-completion activations to reward functions as extra dataset-like columns."""
        if self.sae is None or self._rollout_acts is None:
            yield
            return
        for i, example in enumerate(inputs):
            example["sae_activations"] = self._rollout_acts.select([i])
            example["sae_amplified"] = bool(self._amplified[i]) if self._amplified is not None else False
        try:
            yield
        finally:
            for example in inputs:
                example.pop("sae_activations", None)
                example.pop("sae_amplified", None)

    # -- loss -----------------------------------------------------------------------------------------

    def _add_aux_loss(self, model, inputs, compute):
        """Run `compute()` (the parent's loss) with the residual captured, then add the auxiliary term."""
        if self.aux_loss is None:
            return compute()
        with capture_residual(model, self.sae_layer, detach=False) as capture:
            loss = compute()
        hidden = torch.cat(capture.chunks, dim=0) if len(capture.chunks) > 1 else capture.last
        mask = inputs["completion_mask"]
        if inputs.get("tool_mask") is not None:
            mask = mask * inputs["tool_mask"]  # tool results: the policy never generated them (TRL's loss mask)
        if "completion_ids" in inputs:  # EOS ids are not text (see detection_mask)
            eos = torch.tensor(self._eos_token_ids(), device=inputs["completion_ids"].device, dtype=torch.long)
            mask = mask * ~torch.isin(inputs["completion_ids"], eos)
        aux = self.aux_loss(hidden[:, -mask.shape[1]:], mask)
        mode = "train" if self.model.training else "eval"
        # TRL scales GRPO losses for gradient accumulation itself (loss_is_scaled_for_ga); do the same for
        # our term there, and leave it to transformers' Trainer where TRL does not (RLOO).
        scaled_by_trl = getattr(type(self), "loss_is_scaled_for_ga", False)
        normalizer = self.current_gradient_accumulation_steps if mode == "train" and scaled_by_trl else 1.0
        self._metrics[mode]["sae/aux_loss"].append(self.accelerator.gather(aux.detach()).mean().item())
        return loss + (aux / normalizer).to(loss.dtype)

    # -- TRL overrides shared by GRPO and RLOO --------------------------------------------------------

    def _generate(self, prompts):
        if self.sae is None:
            return super()._generate(prompts)
        # Rows and the amplified-row mask belong to the whole call: the tool loop regenerates subsets of rows.
        self._amplified, self._captured, self._turns = self._amplified_rows(len(prompts)), None, 0
        self._sampled_logprobs = None
        output = super()._generate(prompts)
        tool_mask = output[2] if len(output) == 8 else None  # GRPO: (prompt_ids, completion_ids, tool_mask, ...)
        self._rollout_acts = self._encode_rollouts(output[0], output[1], tool_mask)
        self._rollout_completion_ids = output[1]  # decoded for the top-features table
        return output

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self._amplified is not None and self._amplify_vector is not None and self.model.training:
            self._correct_amplified_rows(output)
        return output

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        with self._with_sae_reward_kwargs(inputs):
            rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._rewards_per_func = rewards_per_func  # every process's rows: the amplified baseline reads them
        self._log_sae_metrics("train" if self.model.training else "eval", rewards_per_func)
        return rewards_per_func

    def _compute_loss(self, model, inputs):
        return self._add_aux_loss(model, inputs, lambda: super(SAETrainerMixin, self)._compute_loss(model, inputs))

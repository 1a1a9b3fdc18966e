"""The SAE machinery shared by the SAE trainers: load, encode rollouts, amplify, auxiliary loss, metrics.

A trainer lists this mixin before its TRL parent, calls `_init_sae()` at the end of `__init__`, and wraps
its parent's `_generate_single_turn` in `_rollout_hooks(...)` (the one method whose signature differs
between GRPO and RLOO). The mixin overrides these TRL methods, each deferring to the parent when no SAE
is configured:

- `_generate`: encodes the rollouts once per generation batch (sparse), from the residual captured during
  generation or from one no-grad forward that stops after the SAE layer;
- `_calculate_rewards`: reward functions also receive ``sae_activations`` (one `CompletionActivations`
  per completion, aligned to its tokens) and ``sae_amplified``; `sae/*` metrics are logged;
- `_compute_loss`: adds the SASFT / suppression term from a hook on the training forward;
- `_save_checkpoint` / `train` (from `SAECheckpointMixin`): the SAE's source, layer and packs are saved
  beside each checkpoint and checked on resume.

The SAE is an attribute of the trainer, not a submodule of the model: it is never saved with the model,
never trained, and never partitioned by ZeRO.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch
from torch import Tensor

from qscope_rl.features.aux_loss import FeatureAuxLoss
from qscope_rl.features.classifier import FeatureClassifier
from qscope_rl.features.detection import code_switch_scores, encode_completions, repetition_scores
from qscope_rl.features.feature_pack import FeaturePack
from qscope_rl.features.probe import completion_probe_tail, probe_scores
from qscope_rl.features.sparse_capture import capture_sparse
from qscope_rl.hooks import ForwardToLayer, add_to_residual, capture_residual, decoder_layer, hidden_size
from qscope_rl.sae.loaders import load_sae

from .checkpoint import SAECheckpointMixin


class SAETrainerMixin(SAECheckpointMixin):
    _sae_pack_fields = ("code_switch_pack", "repetition_pack", "aux_loss_pack", "amplify_pack")
    # Defaults that make every SAE step a no-op until `_init_sae` loads an SAE.
    sae = None
    aux_loss = None
    sae_layer = None
    _captured = None
    _rollout_acts = None
    _amplified = None
    _amplify_vector = None

    # -- set-up ---------------------------------------------------------------------------------------

    def _init_sae(self) -> None:
        args = self.args
        if args.sae_source is None:
            return
        if args.sae_layer is not None:
            decoder_layer(self.model, args.sae_layer)  # a clear error if the policy has no such layer
        dtype = getattr(torch, args.sae_dtype) if args.sae_dtype else None
        sae = load_sae(args.sae_source, args.sae_layer, k=args.sae_k, device=self.accelerator.device, dtype=dtype)
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

    def _generation_is_hookable(self) -> tuple[bool, str]:
        if getattr(self, "use_vllm", False):
            return False, "vLLM generates in its own engine"
        if getattr(self, "use_transformers_continuous_batching", False):
            return False, "continuous batching interleaves requests"
        if getattr(self, "tools", None):
            return False, "tool calls extend completions after generation"
        return True, ""

    def _resolve_capture_mode(self) -> str:
        hookable, why = self._generation_is_hookable()
        if self._amplify_vector is not None and not hookable:
            raise ValueError(f"amplified sampling steers generation with a forward hook, which cannot reach this "
                             f"generation backend ({why}); use plain HF generation (use_vllm=False) or drop "
                             f"amplify_pack")
        mode = self.args.sae_capture
        if mode == "generation" and not hookable:
            raise ValueError(f"sae_capture='generation' is impossible here ({why}); use 'forward' or 'auto'")
        if mode == "auto":
            mode = "generation" if hookable else "forward"
        return mode

    # -- generation -----------------------------------------------------------------------------------

    def _amplified_rows(self, num_rows: int, num_generations: int) -> Tensor:
        """Rows steered in this process: the first m of every group, by global row index."""
        first = self.accelerator.process_index * num_rows
        global_index = torch.arange(first, first + num_rows)
        return (global_index % num_generations) < self.args.amplify_num_rollouts

    @contextmanager
    def _rollout_hooks(self, num_rows: int, num_generations: int):
        """Around one generation call: amplify the chosen rows, and capture the residual if we can."""
        self._captured = None
        self._amplified = torch.zeros(num_rows, dtype=torch.bool)
        with ExitStack() as stack:
            if self._amplify_vector is not None and self.model.training:
                self._amplified = self._amplified_rows(num_rows, num_generations)
                rows = self._amplified.nonzero().flatten()
                stack.enter_context(add_to_residual(self.model_wrapped, self.sae_layer, self._amplify_vector,
                                                    rows=rows))
            capture = None
            if self._capture_mode == "generation":  # encoded as it is generated: top-k codes, never (B, T, d)
                capture = stack.enter_context(capture_sparse(self.model_wrapped, self.sae_layer, self.sae,
                                                             tracked_ids=self._tracked_ids))
            yield
            if capture is not None and capture.sparse.batch is not None:
                self._captured = capture

    def _encode_rollouts(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]):
        """Sparse SAE activations of every completion token, aligned to `completion_ids`."""
        device = self.accelerator.device
        width = max((len(c) for c in completion_ids), default=0)
        # A closing eos is not text: the residual there lights up language features (on the demo world it
        # holds the largest "Chinese" score of most clean English rollouts), so detection leaves it out.
        eos = getattr(self.processing_class, "eos_token_id", None)
        text_lengths = [len(c) - (1 if len(c) and c[-1] == eos else 0) for c in completion_ids]
        lengths = torch.tensor(text_lengths, device=device, dtype=torch.long)
        mask = torch.arange(width, device=device)[None, :] < lengths[:, None]
        if self._captured is not None:
            # Prefill covers the prompt; decode step t feeds completion token t-1. The token sampled last
            # was never fed to the model, so it has no residual here and is left out of the mask.
            captured, self._captured = self._captured, None
            mask &= torch.arange(width, device=device)[None, :] < captured.captured_length
            return captured.completion_activations(mask)
        hidden = self._forward_to_sae_layer(prompt_ids, completion_ids)
        return encode_completions(self.sae, hidden, mask, tracked_ids=self._tracked_ids,
                                  chunk_tokens=self.sae.memory_bounded_chunk())

    @torch.no_grad()
    def _forward_to_sae_layer(self, prompt_ids, completion_ids) -> Tensor:
        """One no-grad forward over prompt + completion that stops after the SAE layer; (B, T_c, d)."""
        device = self.accelerator.device
        pad_id = self.processing_class.pad_token_id if hasattr(self.processing_class, "pad_token_id") else 0
        pad_id = pad_id if pad_id is not None else 0
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
        with ForwardToLayer(self.model_wrapped, self.sae_layer) as forward:
            for start in range(0, len(rows), chunk):
                sl = slice(start, start + chunk)
                residual = forward.run(input_ids=input_ids[sl], attention_mask=attention_mask[sl],
                                       position_ids=position_ids[sl], use_cache=False)
                outputs.append(residual[:, prompt_len:])
        return torch.cat(outputs) if outputs else torch.zeros(0, width, hidden_size(self.model), device=device)

    # -- rewards and metrics --------------------------------------------------------------------------

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

    def _log_sae_metrics(self, mode: str, rewards_per_func: Tensor | None = None) -> None:
        acts = self._rollout_acts
        if self.sae is None or acts is None:
            return
        gather = self.accelerator.gather
        metrics = self._metrics[mode]
        threshold = self.args.sae_detect_threshold
        device = self.accelerator.device
        problem_ids = []
        if self.code_switch_pack is not None:
            scores = code_switch_scores(acts, self.code_switch_pack).per_completion.to(device)
            metrics["sae/code_switch_rate"].append(gather((scores > threshold).float()).mean().item())
            metrics["sae/code_switch_score"].append(gather(scores.float()).mean().item())
            problem_ids.append(self.code_switch_pack.ids)
        if self.repetition_pack is not None:
            scores = repetition_scores(acts, self.repetition_pack).per_completion.to(device)
            metrics["sae/repetition_rate"].append(gather((scores > threshold).float()).mean().item())
            metrics["sae/repetition_score"].append(gather(scores.float()).mean().item())
            problem_ids.append(self.repetition_pack.ids)
        if self.repetition_probe is not None:
            positive = probe_scores(acts, self.repetition_probe).to(device) > 0
            metrics["sae/repetition_probe_rate"].append(gather(positive.float()).mean().item())
        if problem_ids and self.args.sae_log_top_features > 0:
            self._log_top_features(metrics, torch.unique(torch.cat(problem_ids)))
        if self._amplified is not None and rewards_per_func is not None and self._amplify_vector is not None:
            weights = self.reward_weights.to(rewards_per_func.device)
            total = (rewards_per_func * weights).nansum(dim=1)  # gathered over processes already
            amplified = gather(self._amplified.to(device))
            metrics["sae/amplified_fraction"].append(amplified.float().mean().item())
            if amplified.any():
                metrics["sae/reward_amplified"].append(total[amplified].mean().item())
            if (~amplified).any():
                metrics["sae/reward_normal"].append(total[~amplified].mean().item())

    def _log_top_features(self, metrics, ids: Tensor) -> None:
        """Firing rate over completion tokens of the most active problem features (ids as metric values)."""
        acts = self._rollout_acts
        ids = ids.to(acts.indices.device)
        fires = ((acts.indices.unsqueeze(-1) == ids) & (acts.values.unsqueeze(-1) > 0)).any(-2)  # (B, T, f)
        counts = torch.stack([(fires & acts.mask.unsqueeze(-1)).sum((0, 1)).float(), acts.mask.sum().float()
                              .expand(len(ids))])
        counts = self.accelerator.reduce(counts.to(self.accelerator.device), reduction="sum")
        rates = counts[0] / counts[1].clamp(min=1.0)
        top = rates.argsort(descending=True)[: self.args.sae_log_top_features]
        for rank, index in enumerate(top.tolist()):
            metrics[f"sae/top_feature_{rank}/id"].append(float(ids[index]))
            metrics[f"sae/top_feature_{rank}/rate"].append(rates[index].item())

    # -- loss -----------------------------------------------------------------------------------------

    def _add_aux_loss(self, model, inputs, compute):
        """Run `compute()` (the parent's loss) with the residual captured, then add the auxiliary term."""
        if self.aux_loss is None:
            return compute()
        with capture_residual(model, self.sae_layer, detach=False) as capture:
            loss = compute()
        hidden = torch.cat(capture.chunks, dim=0) if len(capture.chunks) > 1 else capture.last
        mask = inputs["completion_mask"]
        eos = getattr(self.processing_class, "eos_token_id", None)
        if eos is not None and "completion_ids" in inputs:
            mask = mask * (inputs["completion_ids"] != eos)  # the closing eos is not text (see _encode_rollouts)
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
        output = super()._generate(prompts)
        if self.sae is not None:
            prompt_ids, completion_ids = output[0], output[1]
            self._rollout_acts = self._encode_rollouts(prompt_ids, completion_ids)
        return output

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        with self._with_sae_reward_kwargs(inputs):
            rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._log_sae_metrics("train" if self.model.training else "eval", rewards_per_func)
        return rewards_per_func

    def _compute_loss(self, model, inputs):
        return self._add_aux_loss(model, inputs, lambda: super(SAETrainerMixin, self)._compute_loss(model, inputs))

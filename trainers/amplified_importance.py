"""Amplified rollouts are samples of the steered policy: the corrections their advantages and losses need.

An amplified rollout was sampled with h + alpha d at layer L (the steered policy mu), not from the policy pi
being trained. `AmplifiedImportanceMixin._correct_amplified_rows` runs after TRL has scored a generation batch:
it weights each amplified token's advantage by min(pi / mu, `amplify_importance_cap`) and keeps TRL's vLLM
sampler corrections (its ratio and its off-policy mask) off those rows, where they would drop or double-correct
them. The weight costs no forward of ours: under vLLM TRL already holds pi and the engine's mu; under HF
generation mu is read from the logits generation computed (`sampled_logprobs.SampledLogprobs`) and pi is TRL's
``old_per_token_logps`` where TRL computes it, else the training forward's own (the advantages are weighed in
`_compute_loss`, between TRL's policy forward and its loss). With
``amplify_baseline='normal'`` (GRPO), each group's baseline comes from its normal rollouts alone.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.utils import logging
from trl.trainer.utils import nanstd  # NaN-aware and Bessel-corrected, as TRL's own advantages

from qscope_rl.hooks import add_to_residual

from .rollout_capture import num_beams

logger = logging.get_logger(__name__)


class AmplifiedImportanceMixin:
    """For `SAETrainerMixin`: needs ``_amplified`` (bool per local row), ``_amplify_vector``, ``sae_layer`` and
    (for ``amplify_baseline='normal'``) ``_rewards_per_func``."""

    _per_sequence_advantages = False  # RLOO's loss takes one advantage per rollout; GRPO's, one per token too

    def _correct_amplified_rows(self, output: dict) -> None:
        # On every process that amplifies (not only those holding amplified rows): the forwards and the metric's
        # gather are collectives under ZeRO-3 and DDP. The weight reads the engine's log-probabilities before
        # the exemption overwrites them, and multiplies the advantages the baseline gives.
        if self.args.amplify_baseline == "normal":
            output["advantages"] = self._normal_baseline_advantages()
        if self.args.amplify_importance_cap is not None:
            output["advantages"] = self._importance_weighted_advantages(output)
        self._exempt_amplified_rows_from_engine_correction(output)

    def _exempt_amplified_rows_from_engine_correction(self, output: dict) -> None:
        """Keep TRL's vLLM sampler corrections off amplified rows: its ratio set to 1, the engine's
        log-probabilities set to pi.

        Under vLLM, TRL weighs every rollout's loss by pi / mu_vLLM (`importance_sampling_ratio`), meant for the
        engine's numerical mismatch, and its off-policy sequence mask (``off_policy_mask_threshold``) drops
        negative-advantage rollouts far from ``sampling_per_token_logps``. An amplified rollout was sampled from
        the steered policy on purpose, so that ratio is about e^-(many) and the mask would catch it: TRL's default
        (per sequence, masked above 3) would silently drop the rollout from the loss, and a per-token mode would
        apply our correction a second time. Its steering is corrected by `_importance_weighted_advantages` alone
        (or, with no cap, not at all)."""
        rows = self._amplified
        if not bool(rows.any()):
            return
        ratio = output.get("importance_sampling_ratio")
        if ratio is not None:
            ratio = ratio.clone()
            ratio[rows.to(ratio.device)] = 1.0
            output["importance_sampling_ratio"] = ratio
        sampled, old = output.get("sampling_per_token_logps"), output.get("old_per_token_logps")
        if sampled is not None and old is not None:
            sampled = sampled.clone()
            sampled[rows.to(sampled.device)] = old[rows.to(old.device)]
            output["sampling_per_token_logps"] = sampled

    def _importance_weighted_advantages(self, output: dict) -> Tensor:
        """The advantages with each amplified token's weight min(pi / mu, cap) folded in.

        An amplified rollout was sampled from the steered policy mu (h + alpha d at layer L), not from the policy
        pi being trained. Treated as pi's own sample, the policy gradient pushes down tokens pi would almost never
        produce, without bound (the gradient of log pi(y) does not vanish as pi(y) -> 0), and on the demo world
        that wrecked training. Truncated importance sampling (Ionides 2008; what TRL applies to vLLM's sampler
        mismatch) keeps the negative signal on the tokens pi itself would plausibly produce: the realistic part
        of the rollout. GRPO takes (B, T) advantages; RLOO's loss is per sequence, so there the weight is the
        mean over the rollout's tokens.

        Where pi would cost a forward of ours, it is left to the training forward (`_pi_from_training_forward`):
        mu goes into the batch (``amplified_mu``, with the rows in ``amplified``) and `_compute_loss` weighs the
        advantages there, so the advantages returned here are TRL's."""
        if self._pi_from_training_forward(output):
            amplified = self._amplified.to(output["completion_ids"].device)
            rows = amplified.nonzero().flatten()
            mu = torch.zeros(output["completion_ids"].shape, device=rows.device)
            got = self._amplified_mu(output, rows)  # on every process: a steered forward is a collective
            if len(rows):
                mu[rows] = got.to(mu.device)
            output["amplified"], output["amplified_mu"] = amplified, mu
            return output["advantages"]
        rows = self._amplified.nonzero().flatten().to(output["completion_mask"].device)
        return self._weigh_advantages(output, rows, self._amplified_token_weights(output))

    def _weigh_advantages(self, batch: dict, rows: Tensor, weight: Tensor) -> Tensor:
        """``batch``'s advantages with ``weight`` ((rows, T), 0 on padding) on ``rows``; logs the mean weight over
        every process's amplified tokens (a collective)."""
        mask, width = batch["completion_mask"], batch["completion_ids"].size(1)
        totals = self.accelerator.gather(torch.stack([weight.sum(), mask[rows].sum().to(weight.dtype)]).reshape(1, 2))
        self._metrics["train"]["sae/amplified_importance_weight"].append(
            (totals[:, 0].sum() / totals[:, 1].sum().clamp(min=1)).item())
        advantages = batch["advantages"]
        if self._per_sequence_advantages:
            advantages = advantages.clone()
            advantages[rows] = advantages[rows] * weight.sum(1) / mask[rows].sum(1).clamp(min=1)
            return advantages
        per_token = (advantages if advantages.dim() == 2 else advantages.reshape(-1, 1).expand(-1, width)).clone()
        per_token[rows] = per_token[rows] * weight
        return per_token

    def _pi_from_training_forward(self, output: dict) -> bool:
        """Whether pi is read from the training forward rather than a no-grad forward of ours: when TRL computed
        no ``old_per_token_logps`` and every micro-batch of this generation is trained in one optimiser step (TRL's
        own condition for taking old = pi.detach(): the training forward runs the weights that generated), and
        the loss is TRL's `_compute_loss` (not Liger's fused loss, which computes no per-token log-probabilities)."""
        generate_every = self.args.steps_per_generation * getattr(self, "num_iterations", 1)
        return (output.get("old_per_token_logps") is None and not getattr(self.args, "use_liger_kernel", False)
                and self.args.gradient_accumulation_steps % generate_every == 0)

    # The batch whose advantages wait for the training forward's pi (set by `_compute_loss` for one forward).
    _awaiting_pi = None

    def _compute_loss(self, model, inputs):
        if "amplified_mu" not in inputs:
            return super()._compute_loss(model, inputs)
        saved = inputs["advantages"]
        self._awaiting_pi = inputs
        try:  # TRL's `_compute_loss` runs the policy forward first, then reads inputs["advantages"]
            return super()._compute_loss(model, inputs)
        finally:
            self._awaiting_pi, inputs["advantages"] = None, saved  # a batch trained again is weighed again

    def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
        out = super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
        batch, self._awaiting_pi = self._awaiting_pi, None
        if batch is not None:  # the training forward of `_compute_loss`: pi, then weigh the advantages
            pi = (out[0] if isinstance(out, tuple) else out).detach()
            rows = batch["amplified"].nonzero().flatten()
            weight = self._truncated_weight(pi[rows], batch["amplified_mu"][rows], batch["completion_mask"][rows])
            batch["advantages"] = self._weigh_advantages(batch, rows, weight)
        return out

    def _truncated_weight(self, pi: Tensor, mu: Tensor, mask: Tensor) -> Tensor:
        """min(pi / mu, cap) on the ``mask``ed tokens, 0 elsewhere. NaN where vLLM could not score a token: no mu
        there, and weight 1 would be the unbounded push-down."""
        weight = torch.exp(pi - mu).clamp(max=self.args.amplify_importance_cap) * mask
        return torch.nan_to_num(weight, nan=0.0)

    def _row_logps(self, output: dict, probe: Tensor) -> Tensor:
        """The policy's per-token log-probabilities of the completions of rows ``probe`` (one forward; steered when
        called inside a steering hook)."""
        input_ids = torch.cat([output["prompt_ids"][probe], output["completion_ids"][probe]], dim=1)
        attention = torch.cat([output["prompt_mask"][probe], output["completion_mask"][probe]], dim=1)
        out = self._get_per_token_logps_and_entropies(self.model, input_ids, attention,
                                                      output["completion_ids"].size(1))
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def _amplified_token_weights(self, output: dict) -> Tensor:
        """min(pi / mu, cap) on each completion token of the amplified rows (0 on padding), (rows, T).

        pi and mu come from TRL's output or the generation record where they can, else from forwards of ours on
        the amplified rows: pi is TRL's ``old_per_token_logps`` (computed under vLLM, or when generation and
        optimisation steps are misaligned); under vLLM, mu is the engine's log-probability of what it sampled
        (``sampling_per_token_logps``, processed as sampled: temperature, top-p), steered on amplified rows. With
        the engine's mu the weight also corrects the engine's numerical mismatch on those rows, which TRL's ratio
        (set to 1 there) no longer does. Under HF generation mu is log_softmax(logits / T) of the sampled token
        from the steered logits generation computed; with beam search, or a record that does not fit (logged),
        a steered forward computes it."""
        rows = self._amplified.nonzero().flatten().to(output["prompt_ids"].device)
        # a process with no amplified row still runs the forwards (on row 0, its weight unused): see the caller
        probe = rows if len(rows) else torch.zeros(1, dtype=torch.long, device=rows.device)
        # Whether a forward runs is decided the same on every process (by the config, which keys TRL returns, and
        # one gathered flag): the forwards are collectives under ZeRO-3.
        old = output.get("old_per_token_logps")
        pi = old[probe] if old is not None else self._row_logps(output, probe)
        mu = self._amplified_mu(output, rows)
        return self._truncated_weight(pi, mu, output["completion_mask"][probe])[: len(rows)]

    @torch.no_grad()
    def _amplified_mu(self, output: dict, rows: Tensor) -> Tensor:
        """mu on the amplified ``rows`` (or, with none here, a placeholder row), (len(rows) or 1, T): the engine's
        log-probabilities under vLLM, else HF generation's record, else a steered forward."""
        probe = rows if len(rows) else torch.zeros(1, dtype=torch.long, device=rows.device)
        old, sampled = output.get("old_per_token_logps"), output.get("sampling_per_token_logps")
        if sampled is not None and old is not None:
            return sampled[probe]
        mu = self._generation_mu(output, probe, rows)
        if mu is not None:
            return mu
        with add_to_residual(self.model, self.sae_layer, self._amplify_vector):  # as generated: every position
            return self._row_logps(output, probe)

    def _mu_from_generation(self) -> bool:
        """Whether HF generation records mu (`SampledLogprobs`): with an importance cap and one sample per row
        (beam search scores beams, it does not sample them; vLLM's engine returns its own log-probabilities)."""
        return (self.args.amplify_importance_cap is not None and num_beams(self) == 1
                and not getattr(self, "use_vllm", False))

    def _generation_mu(self, output: dict, probe: Tensor, rows: Tensor) -> Tensor | None:
        """mu of the amplified rows as HF generation computed it, (len(probe), T), or None when any process could
        not record it (then every process runs the steered forward, a collective under ZeRO-3)."""
        if not self._mu_from_generation():
            return None
        completion_ids = output["completion_ids"]
        mu, why = None, ""
        if len(rows) == 0:  # nothing steered here: a placeholder for the probe row, its weight unused
            mu = torch.zeros(len(probe), completion_ids.size(1), device=completion_ids.device)
        elif self._sampled_logprobs is None:
            why = "no generation record (a generation path that bypasses the hooks)"
        else:
            mu, why = self._sampled_logprobs.completion_logprobs(completion_ids)
        self._sampled_logprobs = None
        failed = torch.tensor([float(mu is None)], device=completion_ids.device)
        if self.accelerator.gather(failed).sum().item() > 0:
            where = why or "on another process"
            logger.warning_once(f"amplified rollouts: mu could not be read from generation ({where}); computing "
                                f"it with a steered forward instead")
            return None
        return mu.to(completion_ids.device)

    @torch.no_grad()
    def _normal_baseline_advantages(self) -> Tensor:
        """This process's GRPO advantages with each group's baseline taken over its normal rollouts only.

        TRL's baseline is the mean (and, with ``scale_rewards`` 'group' or 'batch', the std) over every rollout
        of the group. An amplified rollout is steered into a failure and scores low on purpose, so it lowers the
        mean and inflates the std: every normal rollout's advantage shifts up and shrinks. Here the statistics
        come from the normal rollouts alone and every rollout, amplified or not, is scored against them. Read
        from the summed rewards of all processes that `_calculate_rewards` kept, as TRL computes them
        (unscorable rows, NaN, take no part and get advantage 0)."""
        per_func = self._rewards_per_func  # (all processes' rows, reward functions), gathered by TRL
        group = self.num_generations
        rewards = (per_func * self.reward_weights.to(per_func.device).unsqueeze(0)).nansum(dim=1)
        rewards[torch.isnan(per_func).all(dim=1)] = torch.nan
        amplified = (torch.arange(len(rewards), device=rewards.device) % group) < self.args.amplify_num_rollouts
        normal = rewards.masked_fill(amplified, torch.nan)
        advantages = rewards - torch.nanmean(normal.view(-1, group), dim=1).repeat_interleave(group)
        if self.scale_rewards == "group":
            advantages = advantages / (nanstd(normal.view(-1, group), dim=1).repeat_interleave(group) + 1e-4)
        elif self.scale_rewards == "batch":
            advantages = advantages / (nanstd(normal) + 1e-4)
        advantages = torch.nan_to_num(advantages, nan=0.0)
        local = len(self._amplified)
        start = self.accelerator.process_index * local
        return advantages[start:start + local]

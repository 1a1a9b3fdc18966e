"""The `sae/*` metrics of the SAE RL trainers, reduced over processes, and the top problem features of a step.

TRL's ``log()`` averages every metric over the logging window, so only quantities whose mean means something
are logged as metrics: rates, scores, fractions. Feature ids never are (the mean of ids 399 and 480 is no
feature): each step's most active problem features are logged as ``sae/feature_rate/<id>`` (the share of
completion tokens on which feature ``id`` fires; averaged over the steps of the window in which it was among the
top ``sae_log_top_features``), and `sae_top_features()` returns the last generation batch's list (ids, rates,
mean activations) for tables.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qscope_rl.features.detection import code_switch_scores, repetition_scores
from qscope_rl.features.probe import probe_scores


class SAEMetricsMixin:
    """Needs `self._rollout_acts`, `self._amplified`, the packs and probe, `self.args`, `self._metrics`."""

    _top_features: list[dict] = []

    def sae_top_features(self) -> list[dict]:
        """The last generation batch's most active problem features (code-switch / repetition packs), over every
        process's completion tokens, most frequent first: ``[{"id", "rate", "mean_activation"}, ...]``, at most
        ``sae_log_top_features`` of them (``rate``: share of completion tokens where it fires; ``mean_activation``:
        its mean value where it fires)."""
        return [dict(f) for f in self._top_features]

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
            self._top_features = self._most_active(torch.unique(torch.cat(problem_ids)))
            for feature in self._top_features:
                metrics[f"sae/feature_rate/{feature['id']}"].append(feature["rate"])
        if self._amplified is not None and rewards_per_func is not None and self._amplify_vector is not None:
            weights = self.reward_weights.to(rewards_per_func.device)
            total = (rewards_per_func * weights).nansum(dim=1)  # gathered over processes already
            amplified = gather(self._amplified.to(device))
            metrics["sae/amplified_fraction"].append(amplified.float().mean().item())
            if amplified.any():
                metrics["sae/reward_amplified"].append(total[amplified].mean().item())
            if (~amplified).any():
                metrics["sae/reward_normal"].append(total[~amplified].mean().item())

    def _most_active(self, ids: Tensor) -> list[dict]:
        """Firing rate and mean activation of features ``ids`` over every process's completion tokens; the top n."""
        acts = self._rollout_acts
        ids = ids.to(acts.indices.device)
        match = (acts.indices.unsqueeze(-1) == ids) & (acts.values.unsqueeze(-1) > 0)  # (B, T, k, f)
        match &= acts.mask[..., None, None]
        fires = match.any(-2).sum((0, 1)).float()  # (f,) tokens where each fires
        total = (acts.values.unsqueeze(-1) * match).sum((0, 1, 2)).float()  # (f,) summed activation
        tokens = acts.mask.sum().float().expand(len(ids))
        counts = self.accelerator.reduce(torch.stack([fires, total, tokens]).to(self.accelerator.device),
                                         reduction="sum")
        rates = counts[0] / counts[2].clamp(min=1.0)
        means = counts[1] / counts[0].clamp(min=1.0)
        top = rates.argsort(descending=True, stable=True)[: self.args.sae_log_top_features]
        return [{"id": int(ids[i]), "rate": rates[i].item(), "mean_activation": means[i].item()} for i in top.tolist()]

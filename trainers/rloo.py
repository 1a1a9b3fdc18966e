"""`SAERLOOTrainer`: `trl.RLOOTrainer` with the same SAE rewards, auxiliary loss and amplified sampling as
`SAEGRPOTrainer` (see its docstring); the overrides are the same small methods.

Difference that matters: RLOO does not pre-scale its loss for gradient accumulation
(`loss_is_scaled_for_ga = False`), so the auxiliary term is added unscaled and transformers' Trainer
divides the sum; the shared mixin reads the flag. RLOO's `_generate_single_turn` takes no
`num_generations`: it always samples `self.num_generations` per prompt.
"""

from __future__ import annotations

from trl import RLOOTrainer

from .config import SAERLOOConfig, sae_trainer_config
from .sae_mixin import SAETrainerMixin
from .vllm_rollouts import SAEVLLMMixin


class SAERLOOTrainer(SAEVLLMMixin, SAETrainerMixin, RLOOTrainer):
    _tag_names = ["trl", "rloo", "qscope-rl", "sae"]
    _per_sequence_advantages = True  # RLOO's loss weighs whole rollouts (see `_importance_weighted_advantages`)

    def __init__(self, model, reward_funcs=None, args=None, *more, **kwargs):
        # The config is checked (or defaulted) before the parent's whole set-up: a drop-in for RLOOTrainer.
        args = sae_trainer_config(SAERLOOConfig, args, model, "RLOO")
        super().__init__(model, reward_funcs, args, *more, **kwargs)
        self._init_sae()

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields):
        if self.sae is None:
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields)
        with self._rollout_hooks(prompt_ids):
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields)

"""`SAEGRPOTrainer`: `trl.GRPOTrainer` with SAE-encoded rollouts, SAE rewards, an auxiliary loss and
amplified sampling.

What differs from the parent: generation runs inside hooks that capture the layer-L residual (no extra
forward pass on the plain HF path) and add ``alpha * d`` to m rollouts of every group (the Qwen-Scope RL
recipe), under HF generate or inside TRL's colocated vLLM engine (`vllm_rollouts.SAEVLLMMixin`); the rest
(encoding, reward kwargs, `sae/*` metrics, auxiliary loss, checkpoint sidecar) comes from `SAETrainerMixin`.
With `sae_source=None` every override defers to the parent: it is `GRPOTrainer`.

Departures from the papers: Qwen-Scope's RL recipe uses DAPO; here any TRL loss type works. The amplified
rollouts are samples of the steered policy, so each of their tokens' advantage carries the truncated importance
weight min(pi / mu, `amplify_importance_cap`) (`trainers/amplified_importance.py`); with the cap
set to None they are treated as on-policy samples, as the recipe describes them.
"""

from __future__ import annotations

from trl import GRPOTrainer

from .config import SAEGRPOConfig, sae_trainer_config
from .sae_mixin import SAETrainerMixin
from .vllm_rollouts import SAEVLLMMixin


class SAEGRPOTrainer(SAEVLLMMixin, SAETrainerMixin, GRPOTrainer):
    _tag_names = ["trl", "grpo", "qscope-rl", "sae"]

    def __init__(self, model, reward_funcs=None, args=None, *more, **kwargs):
        # The config is checked (or defaulted) before the parent's whole set-up: a drop-in for GRPOTrainer.
        args = sae_trainer_config(SAEGRPOConfig, args, model, "GRPO")
        super().__init__(model, reward_funcs, args, *more, **kwargs)
        self._init_sae()

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if self.sae is None:
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                 has_tool_images)
        with self._rollout_hooks(prompt_ids):
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                 has_tool_images)

"""TRL trainer subclasses that put SAE features into training (``qscope_rl.trainers``)."""

from .config import SAEArguments, SAEGRPOConfig, SAERLOOConfig
from .grpo import SAEGRPOTrainer
from .rloo import SAERLOOTrainer

__all__ = ["SAEArguments", "SAEGRPOConfig", "SAEGRPOTrainer", "SAERLOOConfig", "SAERLOOTrainer"]

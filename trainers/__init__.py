"""TRL trainer subclasses, a monitor callback and a loss helper that put SAE features into training
(``qscope_rl.trainers``)."""

from .config import SAEArguments, SAEGRPOConfig, SAERLOOConfig, SASFTConfig
from .grpo import SAEGRPOTrainer
from .loss_helper import SAELossHelper
from .monitor import SAEMonitor, SAEMonitorCallback
from .rloo import SAERLOOTrainer
from .sasft import SASFTTrainer

__all__ = ["SAEArguments", "SAEGRPOConfig", "SAEGRPOTrainer", "SAELossHelper", "SAEMonitor", "SAEMonitorCallback",
           "SAERLOOConfig", "SAERLOOTrainer", "SASFTConfig", "SASFTTrainer"]

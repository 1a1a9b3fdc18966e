"""Reward functions following TRL's reward contract (``qscope_rl.rewards``)."""

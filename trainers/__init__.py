"""TRL trainer subclasses and callbacks that put SAE features into training (``qscope_rl.trainers``)."""

"""One run's life: the config system, safe file I/O and checkpoints, the training callbacks,
train/resume/load, the one episode loop (evaluate, video, diagnosis) and the video overlay.

Nothing here is imported by the algorithm (``agents.tokenizer``, ``agents.policy``,
``agents.ppo``, ...): dependencies point from here to there. ``import agents.experiment.config``
costs no torch or stable-baselines3 import.
"""

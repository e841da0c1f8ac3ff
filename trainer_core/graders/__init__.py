"""Graders: score completions for PPO/GRPO (specs: ``trainer_core.grader_config``).

``trainer_core.graders.scoring.build_grader`` turns a stage's reward (a grader or a Tuneyard reward
spec) into a batch scorer. Modules here import torch only where a grader needs it (reward models).
"""

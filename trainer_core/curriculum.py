"""Curricula: which prompts an RL stage may draw at each step, and the order SAD sees trajectories in.

Prompt curriculum (PPO/GRPO): prompts carry an integer ``difficulty``; the stage starts at
``start_level`` and admits the next difficulty present in the data once the success rate over the
last ``window`` prompts passes ``threshold`` (the window restarts at each new level, so the rate
measures the current mix). A prompt's success is its mean reward over its completions clipped to
[0, 1]: for 0/1 rewards such as exact match it is the fraction of completions that solved it.

Prompt draws are a pure function of (seed, stage_index, step) and the current level, and the level
and window live in ``state_dict``, so a resumed stage draws exactly the prompts it would have.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import Any

import torch

from trainer_core.config import PromptCurriculum
from trainer_core.generation import seeded_generator


class DifficultyCurriculum:
    """Tracks the admitted difficulty level from per-prompt successes."""

    def __init__(self, difficulties: Sequence[int], config: PromptCurriculum) -> None:
        if not difficulties:
            raise ValueError("a prompt curriculum needs at least one prompt")
        self._levels = sorted(set(difficulties))
        self._config = config
        # Starting below every difficulty present would admit nothing: begin at the easiest level.
        self.level = max(config.start_level, self._levels[0])
        self._window: deque[float] = deque(maxlen=config.window)

    @property
    def success_rate(self) -> float:
        """Returns the mean success over the current window (0 when empty)."""
        return sum(self._window) / len(self._window) if self._window else 0.0

    def observe(self, successes: Sequence[float]) -> None:
        """Adds per-prompt successes (clipped to [0, 1]) and admits the next level when the bar is passed."""
        for success in successes:
            self._window.append(min(max(float(success), 0.0), 1.0))
            harder = [level for level in self._levels if level > self.level]
            full = len(self._window) == self._window.maxlen
            if harder and full and self.success_rate > self._config.threshold:
                self.level = harder[0]
                self._window.clear()

    def metrics(self) -> dict[str, float]:
        """Returns ``curriculum/level`` and ``curriculum/success_rate``."""
        return {"curriculum/level": float(self.level), "curriculum/success_rate": self.success_rate}

    def state_dict(self) -> dict[str, Any]:
        """Returns the level and the success window."""
        return {"level": self.level, "window": list(self._window)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what ``state_dict`` returned."""
        self.level = int(state["level"])
        self._window = deque((float(s) for s in state["window"]), maxlen=self._config.window)


class PromptSchedule:
    """Picks the prompt indices of each step: epoch-wise shuffles, or draws from the admitted curriculum pool.

    Without a curriculum, step ``s`` takes the next ``per_step`` indices of a sequence of epochs,
    each a permutation seeded by (seed, stage_index, epoch). With one, the admitted pool changes
    as the level rises, so each step draws ``per_step`` prompts without replacement from the pool
    with a generator seeded by (seed, stage_index, step) (wrapping when the pool is smaller).
    """

    def __init__(
        self,
        difficulties: Sequence[int],
        per_step: int,
        seed: int,
        stage_index: int,
        curriculum: PromptCurriculum | None = None,
    ) -> None:
        if not difficulties:
            raise ValueError("the stage has no prompts to train on")
        self._difficulties = list(difficulties)
        self._per_step = per_step
        self._seed = seed
        self._stage_index = stage_index
        self.curriculum = DifficultyCurriculum(difficulties, curriculum) if curriculum else None

    def steps_per_epoch(self) -> int:
        """Returns the steps one pass over all prompts takes."""
        return math.ceil(len(self._difficulties) / self._per_step)

    def indices(self, step: int) -> list[int]:
        """Returns the prompt indices of 1-based ``step``."""
        if self.curriculum is not None:
            pool = [i for i, d in enumerate(self._difficulties) if d <= self.curriculum.level]
            generator = seeded_generator(self._seed, self._stage_index, step)
            order = torch.randperm(len(pool), generator=generator)
            return [pool[int(order[k % len(pool)])] for k in range(self._per_step)]
        count = len(self._difficulties)
        start = (step - 1) * self._per_step
        orders: dict[int, torch.Tensor] = {}
        picked: list[int] = []
        for position in range(start, start + self._per_step):
            epoch, offset = divmod(position, count)
            if epoch not in orders:
                generator = seeded_generator(self._seed, self._stage_index, epoch)
                orders[epoch] = torch.randperm(count, generator=generator)
            picked.append(int(orders[epoch][offset]))
        return picked

    def observe(self, successes: Sequence[float]) -> dict[str, float]:
        """Returns the curriculum metrics after recording per-prompt successes ({} without a curriculum)."""
        if self.curriculum is None:
            return {}
        self.curriculum.observe(successes)
        return self.curriculum.metrics()

    def state_dict(self) -> dict[str, Any]:
        """Returns the curriculum state ({} without a curriculum)."""
        return self.curriculum.state_dict() if self.curriculum else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what ``state_dict`` returned."""
        if self.curriculum is not None and state:
            self.curriculum.load_state_dict(state)


def complexity_order(step_counts: Sequence[int], lengths: Sequence[int]) -> list[int]:
    """Returns trajectory indices from simple to complex: fewer steps first, then fewer tokens.

    SAD's curriculum (arXiv 2505.13820) trains on simple trajectories before complex ones; the
    number of reasoning/action steps and the token length stand in for complexity. Ties keep the
    original order (a stable sort), so the order is deterministic.
    """
    if len(step_counts) != len(lengths):
        raise ValueError("step_counts and lengths must describe the same trajectories")
    return sorted(range(len(lengths)), key=lambda i: (step_counts[i], lengths[i]))

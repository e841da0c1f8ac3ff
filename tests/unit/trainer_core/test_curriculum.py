from __future__ import annotations

from collections import Counter

import pytest

from trainer_core.config import PromptCurriculum
from trainer_core.curriculum import DifficultyCurriculum, PromptSchedule, complexity_order

DIFFICULTIES = [0, 0, 0, 1, 1, 2, 2, 2, 5]


def test_level_rises_only_after_a_full_window_passes_the_threshold() -> None:
    curriculum = DifficultyCurriculum(DIFFICULTIES, PromptCurriculum(threshold=0.5, window=4))
    assert curriculum.level == 0
    curriculum.observe([1.0, 1.0, 1.0])  # window not full yet
    assert curriculum.level == 0
    curriculum.observe([0.0])  # 3/4 > 0.5 with a full window
    assert curriculum.level == 1
    assert curriculum.metrics() == {"curriculum/level": 1.0, "curriculum/success_rate": 0.0}
    curriculum.observe([1.0, 0.0, 1.0, 0.0])  # exactly 0.5 does not pass
    assert curriculum.level == 1
    curriculum.observe([1.0])  # window slides to [0, 1, 0, 1] -> still 0.5
    assert curriculum.level == 1
    curriculum.observe([1.0])  # [1, 0, 1, 1] = 0.75
    assert curriculum.level == 2
    curriculum.observe([2.0, 1.0, 1.0, 1.0])  # rewards above 1 count as one success
    assert curriculum.level == 5
    assert curriculum.metrics()["curriculum/success_rate"] == 0.0


def test_start_level_below_the_data_begins_at_the_easiest_level() -> None:
    assert DifficultyCurriculum([3, 4], PromptCurriculum(start_level=0)).level == 3
    assert DifficultyCurriculum([3, 4], PromptCurriculum(start_level=4)).level == 4


def test_curriculum_state_round_trips() -> None:
    config = PromptCurriculum(threshold=0.9, window=3)
    curriculum = DifficultyCurriculum(DIFFICULTIES, config)
    curriculum.observe([1.0, 1.0, 1.0, 0.2, 0.4])
    restored = DifficultyCurriculum(DIFFICULTIES, config)
    restored.load_state_dict(curriculum.state_dict())
    assert restored.metrics() == curriculum.metrics()
    for outcome in ([1.0], [1.0], [1.0], [0.0]):
        curriculum.observe(outcome)
        restored.observe(outcome)
        assert restored.metrics() == curriculum.metrics()


def test_schedule_without_curriculum_covers_each_epoch_once_and_is_deterministic() -> None:
    schedule = PromptSchedule(DIFFICULTIES, per_step=3, seed=7, stage_index=1)
    assert schedule.steps_per_epoch() == 3
    first_epoch = [i for step in (1, 2, 3) for i in schedule.indices(step)]
    assert sorted(first_epoch) == list(range(len(DIFFICULTIES)))
    again = PromptSchedule(DIFFICULTIES, per_step=3, seed=7, stage_index=1)
    assert [again.indices(s) for s in range(1, 7)] == [schedule.indices(s) for s in range(1, 7)]
    other_seed = PromptSchedule(DIFFICULTIES, per_step=3, seed=8, stage_index=1)
    assert [other_seed.indices(s) for s in (1, 2, 3)] != [schedule.indices(s) for s in (1, 2, 3)]
    # An epoch boundary inside a step: 9 prompts, 4 per step, step 3 takes 1 + 3 from two epochs.
    uneven = PromptSchedule(DIFFICULTIES, per_step=4, seed=0, stage_index=0)
    counts = Counter(i for step in range(1, 10) for i in uneven.indices(step))
    assert set(counts.values()) == {4}


def test_schedule_with_curriculum_draws_only_admitted_prompts_and_reports() -> None:
    schedule = PromptSchedule(
        DIFFICULTIES, per_step=4, seed=0, stage_index=0, curriculum=PromptCurriculum(threshold=0.5, window=4)
    )
    assert all(DIFFICULTIES[i] == 0 for i in schedule.indices(1))  # pool of 3, drawn with wrap
    metrics = schedule.observe([1.0, 1.0, 1.0, 1.0])
    assert metrics == {"curriculum/level": 1.0, "curriculum/success_rate": 0.0}
    drawn = {i for step in range(2, 12) for i in schedule.indices(step)}
    assert drawn == {0, 1, 2, 3, 4}
    state = schedule.state_dict()
    resumed = PromptSchedule(
        DIFFICULTIES, per_step=4, seed=0, stage_index=0, curriculum=PromptCurriculum(threshold=0.5, window=4)
    )
    resumed.load_state_dict(state)
    assert resumed.indices(5) == schedule.indices(5)


def test_complexity_order_sorts_by_steps_then_length() -> None:
    assert complexity_order([3, 1, 3, 1], [10, 50, 5, 20]) == [3, 1, 2, 0]
    with pytest.raises(ValueError):
        complexity_order([1], [1, 2])

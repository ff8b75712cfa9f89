"""Tests for tfbn.finetune.skip_limit: consecutive non-finite skips stop a run."""

import pytest

from tfbn.finetune import skip_limit


def test_skip_streak_counts_only_consecutive_skips():
    streak = skip_limit.SkipStreak(3)
    for step, applied in enumerate([False, False, True, False, False, True], start=1):
        streak.add(step, applied)
    streak.add(7, applied=False)
    streak.add(8, applied=False)
    with pytest.raises(skip_limit.NonFiniteTrainingError, match=r"steps 7 to 9.*now 0.5"):
        streak.add(9, applied=False, learning_rate=0.5)

"""Stopping a run whose steps keep being skipped as non-finite.

The train step skips a step whose loss or gradient is not finite (it applies
nothing). A few such steps are harmless; a run whose steps are all skipped has
diverged and would otherwise "finish" unchanged and exit 0. `SkipStreak`
counts consecutive skips and raises `NonFiniteTrainingError` at the limit
(`max_consecutive_skipped_steps`).
"""

from __future__ import annotations


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive steps were skipped because they were not finite."""


class SkipStreak:
    """Counts consecutive skipped steps and stops a run that keeps skipping.

    A skipped step changes no weight, so a run whose steps are all skipped
    would otherwise "finish" with the model it started from and exit 0.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.length = 0
        self.first_step = None

    def add(self, step: int, applied: bool, learning_rate: float | None = None) -> None:
        """Records one step's verdict.

        Args:
            step: The global step just taken.
            applied: Whether the step was applied (False: skipped as non-finite).
            learning_rate: The configured learning rate, quoted in the error.

        Raises:
            NonFiniteTrainingError: When `limit` (> 0) steps in a row were skipped.
        """
        if applied:
            self.length, self.first_step = 0, None
            return
        self.length += 1
        if self.first_step is None:
            self.first_step = step
        if self.limit and self.length >= self.limit:
            raise NonFiniteTrainingError(
                f"{self.length} consecutive steps (steps {self.first_step} to {step}) were "
                "skipped because the loss or a gradient was not finite, so training "
                "changes nothing any more: the model has diverged or the data holds "
                f"NaN/inf values. Lower `learning_rate` (now {learning_rate!r}), check "
                "the input data, or raise `max_consecutive_skipped_steps` (now "
                f"{self.limit}; 0 never stops). Checkpoints already written are kept."
            )

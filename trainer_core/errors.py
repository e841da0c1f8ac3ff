"""Errors the trainer raises for problems on the user's side (data, spec), as opposed to system faults.

The worker marks a run failed with the message of a `TrainingDataError` and does not retry it;
any other exception is a system error (retried by the reaper up to the attempt cap).
"""

from __future__ import annotations


class TrainingDataError(ValueError):
    """The run cannot train on what the user supplied; the message says what and where to fix."""


class GraderFailure(RuntimeError):
    """A stage's reward cannot be computed at all (judge down after its retries, no sandbox, no key).

    Not one sample's problem (those score 0 and are counted): the step cannot be scored, so the run
    fails at once with this message instead of training on meaningless rewards.
    """

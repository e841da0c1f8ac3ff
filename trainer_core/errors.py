"""Errors the trainer raises for problems on the user's side (data, spec), as opposed to system faults.

The worker marks a run failed with the message of a `TrainingDataError` and does not retry it;
any other exception is a system error (retried by the reaper up to the attempt cap).
"""

from __future__ import annotations


class TrainingDataError(ValueError):
    """The run cannot train on what the user supplied; the message says what and where to fix."""

"""Datasets for training: record formats and validation (torch-free), rendering, packing, mixtures.

This package's `__init__` stays import-light: the API imports `records` and `validate` without torch.
"""

# Label value that cross-entropy skips: prompt tokens, padding, and packed-sequence boundaries.
IGNORE_INDEX = -100

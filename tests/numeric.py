"""Comparisons that hold on any CPU: tolerances sized to the signal, exactness only where it is owed.

PyTorch picks its kernels at run time (``ATEN_CPU_CAPABILITY``: AVX-512, AVX2 or plain code;
oneDNN's own ISA; 1 or 2 threads), and two code paths that compute the same value (merged vs
unmerged weights, a batch of two vs one image, a fresh load vs a deep copy, a regional processor
vs the plain one) may round differently under one kernel choice and identically under another.
So:

- the same kernels on the same tensors (a checkpoint round trip, unmerge restoring stored
  weights, a deterministic permutation) are compared bit for bit (``torch.equal``);
- different code paths are compared with ``assert_close_to_signal``: every element within
  `rel` of the largest magnitude in the expected value (round-off grows with the numbers
  involved, so a fixed absolute tolerance is too strict on large outputs and vacuous on tiny ones);
- 8-bit images from different code paths may differ by one level where a value lies on a
  rounding boundary: ``same_image`` allows that much and no more, and ``differ`` asks for a
  difference far beyond it.

``make test-cpus`` runs the numeric tests under other kernels and two threads (README).
"""

from __future__ import annotations

import numpy as np
import torch


def assert_close_to_signal(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5, msg: str | None = None) -> None:
    """|actual - expected| <= rel · max|expected| elementwise (and equal shapes and dtypes)."""
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=0, atol=rel * scale + 1e-12, msg=msg)


def same_image(a, b, levels: int = 1) -> bool:
    """Two 8-bit images equal up to `levels` (one rounding step by default) in every pixel and channel."""
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max()) <= levels


def differ(a, b, levels: int = 8) -> bool:
    """Two 8-bit images that differ by more than `levels` somewhere: far beyond round-off."""
    a, b = np.asarray(a), np.asarray(b)
    return a.shape != b.shape or int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max()) > levels

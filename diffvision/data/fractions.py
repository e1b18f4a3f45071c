"""Stratified, deterministic, nested training subsets ("train on 10% of the data").

For a seed, every class ``c`` gets one fixed random order of its samples, drawn from
``numpy.random.default_rng([seed, c])`` (its own stream: no global RNG, no dependence on other
classes, the same in every process and on every platform). A fraction ``f`` keeps the first

    k_c = floor(f * n_c + 1/2)        (n_c samples of class c; round half up)

samples of that order. So the subset is stratified (each class keeps its share), exact (the sizes
above, nothing random about them) and nested: for one seed, ``f1 <= f2`` gives a subset of ``f2``'s.
For CIFAR-10 (5000 per class) 1% keeps 50 per class = 500, 10% keeps 5000, 25% keeps 12500.
A fraction that would leave some class with no sample is rejected.

``fraction_mode="unstratified"`` (:func:`unstratified_subset`) is the other protocol, ESPFormer's: one random
order of the whole training split, from ``numpy.random.default_rng(seed)``, and a fraction keeps its first
``floor(f * n + 1/2)`` samples, whatever their classes. Also nested; with one seed for every run (as ESPFormer
draws its subsets once) every run trains on the same images.
"""
from __future__ import annotations

import math
import numbers
from fractions import Fraction
from typing import Optional, Sequence

import numpy as np

from ..choices import check_choice

__all__ = ["FRACTION_MODES", "check_fraction", "check_seed", "per_class_counts", "smallest_fraction",
           "stratified_subset", "training_subset", "unstratified_subset"]

FRACTION_MODES = ("stratified", "unstratified")


def check_fraction(fraction) -> float:
    """``fraction`` as a float in (0, 1]; anything else raises a ValueError saying so."""
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real):
        raise ValueError(f"data_fraction must be a number in (0, 1], got {fraction!r} "
                         f"({type(fraction).__name__})")
    value = float(fraction)
    if not math.isfinite(value) or not 0.0 < value <= 1.0:
        raise ValueError(f"data_fraction must be in (0, 1] (e.g. 0.1 for 10% of the training set), "
                         f"got {fraction!r}")
    return value


def check_seed(seed) -> int:
    """``seed`` as a non-negative int; bools, floats and strings are rejected (no silent rounding)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"fraction_seed must be a non-negative integer, got {seed!r} "
                         f"({type(seed).__name__})")
    if seed < 0:
        raise ValueError(f"fraction_seed must be a non-negative integer, got {seed}")
    return int(seed)


def per_class_counts(class_sizes: Sequence[int], fraction: float) -> list[int]:
    """``k_c = floor(fraction * n_c + 1/2)`` for each class size ``n_c`` (round half up)."""
    fraction = check_fraction(fraction)
    exact = Fraction(repr(fraction))  # the decimal the user wrote: 0.29 * 50 is 14.5, not 14.4999...
    return [min(int(n), math.floor(exact * int(n) + Fraction(1, 2))) for n in class_sizes]


def smallest_fraction(class_size: int, significant_digits: int = 3) -> float:
    """The smallest data_fraction, to ``significant_digits`` digits, that keeps a sample of a class of
    ``class_size`` samples (``per_class_counts([class_size], f) == [1]``).

    ``0.5 / n`` is the exact bound, but printed to a few digits it may round down and fail (0.5/6 =
    0.08333... -> 0.0833 keeps nothing), so the bound is rounded up, and checked in float arithmetic."""
    if isinstance(class_size, bool) or not isinstance(class_size, numbers.Integral) or class_size < 1:
        raise ValueError(f"class_size must be a positive integer, got {class_size!r}")
    bound = Fraction(1, 2 * int(class_size))
    digits = significant_digits - 1 - math.floor(math.log10(bound))
    for d in range(digits, digits + 17):
        candidate = float(Fraction(math.ceil(bound * 10**d), 10**d))
        if candidate <= 1.0 and per_class_counts([class_size], candidate)[0] >= 1:
            return candidate
    return 1.0


def stratified_subset(
    labels,
    fraction: float,
    seed: int,
    class_names: Optional[Sequence[str]] = None,
) -> np.ndarray:
    """Indices (sorted, int64) of the stratified ``fraction`` subset of a dataset with ``labels``.

    Args:
        labels: one non-negative integer class label per sample.
        fraction: in (0, 1]; 1 keeps everything.
        seed: non-negative int; picks the per-class orders (and so which samples are kept).
        class_names: only used to name a class in error messages.
    """
    fraction = check_fraction(fraction)
    seed = check_seed(seed)
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise ValueError(f"labels must be non-negative integers, got dtype {labels.dtype}")
    classes, sizes = np.unique(labels, return_counts=True)
    counts = per_class_counts(sizes.tolist(), fraction)
    empty = [int(c) for c, k in zip(classes, counts) if k == 0]
    if empty:
        smallest = int(sizes.min())
        names = [class_names[c] if class_names is not None and c < len(class_names) else str(c)
                 for c in empty]
        shown = f"{names[:10]} and {len(names) - 10} more" if len(names) > 10 else f"{names}"
        raise ValueError(
            f"data_fraction={fraction} leaves class(es) {shown} with no training sample "
            f"(k_c = floor(fraction * n_c + 1/2), smallest class has n_c={smallest}); "
            f"use data_fraction >= {smallest_fraction(smallest)}")
    keep = []
    for c, k in zip(classes, counts):
        members = np.flatnonzero(labels == c)  # ascending dataset order
        order = np.random.default_rng([seed, int(c)]).permutation(members.size)
        keep.append(members[order[:k]])
    return np.sort(np.concatenate(keep)).astype(np.int64)


def unstratified_subset(num_samples: int, fraction: float, seed: int) -> np.ndarray:
    """Indices (sorted, int64) of the first ``floor(fraction * num_samples + 1/2)`` samples of one random
    order of all ``num_samples`` (``default_rng(seed).permutation``): nested in ``fraction``, blind to classes."""
    fraction, seed = check_fraction(fraction), check_seed(seed)
    count = per_class_counts([num_samples], fraction)[0]
    if count == 0:
        raise ValueError(f"data_fraction={fraction} keeps no sample of {num_samples} (floor(fraction * n + 1/2) = 0); "
                         f"use data_fraction >= {smallest_fraction(num_samples)}")
    return np.sort(np.random.default_rng(seed).permutation(num_samples)[:count]).astype(np.int64)


def training_subset(labels, fraction: float, seed: int, mode: str = "stratified",
                    class_names: Optional[Sequence[str]] = None) -> np.ndarray:
    """The training subset of ``fraction_mode`` ``mode``: :func:`stratified_subset` or :func:`unstratified_subset`."""
    if check_choice("fraction_mode", mode, FRACTION_MODES) == "stratified":
        return stratified_subset(labels, fraction, seed, class_names)
    return unstratified_subset(len(labels), fraction, seed)

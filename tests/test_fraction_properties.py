"""Property tests (hypothesis) of the data-fraction subsets, ``diffvision.data.stratified_subset``.

Random class sizes, class ids, label orders, fractions and seeds, checked against the documented rule
``k_c = floor(f * n_c + 1/2)`` computed in exact rational arithmetic, plus stratification, nesting,
independence of classes from each other, determinism and variety across seeds. (tests/test_data.py
has the fixed-example versions: CIFAR-10 sizes, one nested chain, another process, bad arguments.)
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diffvision.data import stratified_subset


@st.composite
def labelled_datasets(draw, max_classes=6, min_size=1, max_size=60, big_class=False):
    """Labels with random class sizes, class ids that need not be 0..C-1, in a random order; with
    ``big_class`` the first class has 50-80 samples."""
    sizes = draw(st.lists(st.integers(min_size, max_size), min_size=1, max_size=max_classes))
    if big_class:
        sizes[0] = draw(st.integers(50, 80))
    ids = draw(st.lists(st.integers(0, 50), min_size=len(sizes), max_size=len(sizes), unique=True))
    labels = np.concatenate([np.full(n, c, dtype=np.int64) for c, n in zip(ids, sizes)])
    order = draw(st.permutations(range(len(labels))))
    return labels[np.asarray(order, dtype=np.int64)]


def dyadic(low=Fraction(0), high=Fraction(1), min_m=0):
    """Fractions k / 2^m (m <= 10) in (low, high]: exact in binary, so the float rule and the exact rule
    cannot disagree here; decimal fractions are pinned separately (test_decimal_fractions_round_half_up)."""
    return st.integers(min_m, 10).flatmap(lambda m: st.integers(
        max(1, math.floor(low * 2**m) + 1), math.floor(high * 2**m)).map(lambda k: Fraction(k, 2**m)))


dyadic_fractions = dyadic()
# with every class of >= 4 samples, f >= 1/8 keeps at least one (floor(4/8 + 1/2) = 1): no filtering needed
sizeable_datasets = labelled_datasets(min_size=4)
sizeable_fractions = dyadic(low=Fraction(1, 8) - Fraction(1, 2**11))
any_fractions = st.floats(min_value=1e-3, max_value=1.0, exclude_min=False)
seeds = st.integers(0, 2**63 - 1)


def class_counts(labels, idx):
    classes = np.unique(labels)
    return {int(c): int((labels[idx] == c).sum()) for c in classes}


def exact_k(fraction: Fraction, n: int) -> int:
    return math.floor(fraction * n + Fraction(1, 2))


@settings(max_examples=80, deadline=None)
@given(labels=labelled_datasets(), fraction=dyadic_fractions, seed=seeds)
def test_sizes_are_round_half_up_of_f_times_n_per_class(labels, fraction, seed):
    classes, sizes = np.unique(labels, return_counts=True)
    want = {int(c): exact_k(fraction, int(n)) for c, n in zip(classes, sizes)}
    if min(want.values()) == 0:  # some class would get no sample: refused, naming a fraction that works
        with pytest.raises(ValueError, match=r"no training sample.*use data_fraction >= "):
            stratified_subset(labels, float(fraction), seed)
        return
    idx = stratified_subset(labels, float(fraction), seed)
    assert class_counts(labels, idx) == want
    assert len(idx) == sum(want.values())


@settings(max_examples=80, deadline=None)
@given(labels=labelled_datasets(), fraction=any_fractions, seed=seeds)
def test_subset_is_valid_and_stratified_for_any_fraction(labels, fraction, seed):
    classes, sizes = np.unique(labels, return_counts=True)
    try:
        idx = stratified_subset(labels, fraction, seed)
    except ValueError as err:  # only when some class would round to zero samples
        assert "no training sample" in str(err)
        assert min(fraction * n for n in sizes) < 0.5 + 1e-9
        return
    assert idx.dtype == np.int64 and idx.ndim == 1
    assert np.all(np.diff(idx) > 0) and idx[0] >= 0 and idx[-1] < len(labels)  # sorted, unique, in range
    counts = class_counts(labels, idx)
    for c, n in zip(classes, sizes):
        k = counts[int(c)]
        assert 1 <= k <= n
        assert abs(k - fraction * n) <= 0.5 + 1e-9  # each class keeps its share, to the nearest sample
    if fraction == 1.0:
        np.testing.assert_array_equal(idx, np.arange(len(labels)))


@settings(max_examples=60, deadline=None)
@given(labels=sizeable_datasets, fractions=st.lists(sizeable_fractions, min_size=2, max_size=4), seed=seeds)
def test_smaller_fraction_is_a_subset_of_a_larger_one(labels, fractions, seed):
    fractions = sorted(fractions)
    subsets = [set(stratified_subset(labels, float(f), seed).tolist()) for f in fractions]
    for small, large in zip(subsets, subsets[1:]):
        assert small <= large


@settings(max_examples=60, deadline=None)
@given(labels=sizeable_datasets, extra=st.integers(4, 30), fraction=sizeable_fractions, seed=seeds)
def test_a_class_selection_does_not_depend_on_other_classes(labels, extra, fraction, seed):
    """Appending samples of a new class leaves every existing class's selection unchanged."""
    before = stratified_subset(labels, float(fraction), seed)
    grown = np.concatenate([labels, np.full(extra, labels.max() + 1)])
    after = stratified_subset(grown, float(fraction), seed)
    np.testing.assert_array_equal(after[after < len(labels)], before)


@settings(max_examples=40, deadline=None)
@given(labels=labelled_datasets(), fraction=any_fractions, seed=seeds)
def test_same_arguments_give_the_same_subset(labels, fraction, seed):
    try:
        first = stratified_subset(labels, fraction, seed)
    except ValueError:
        return
    np.random.seed(seed % 2**32)  # the global RNGs play no part
    np.random.rand(7)
    np.testing.assert_array_equal(stratified_subset(labels.copy(), fraction, seed), first)


@settings(max_examples=40, deadline=None)
@given(labels=labelled_datasets(min_size=2, big_class=True),
       fraction=dyadic(low=Fraction(1, 4) - Fraction(1, 2**11), high=Fraction(3, 4), min_m=2),
       seeds=st.lists(seeds, min_size=2, max_size=2, unique=True))
def test_different_seeds_pick_different_subsets(labels, fraction, seeds):
    sizes = np.unique(labels, return_counts=True)[1]
    ks = [exact_k(fraction, int(n)) for n in sizes]
    # a collision is practically impossible: the big class has > 1e9 possible selections
    assert min(ks) >= 1 and max(math.comb(int(n), k) for n, k in zip(sizes, ks)) > 10**9
    a, b = (stratified_subset(labels, float(fraction), s) for s in seeds)
    assert len(a) == len(b) and not np.array_equal(a, b)


def test_every_sample_is_chosen_about_equally_often_across_seeds():
    """Across 400 seeds a 25% subset of 4 classes × 40 picks each sample ~100 times (binomial sd ≈ 8.7):
    no sample is favoured by its position (e.g. always the first ones of a class)."""
    labels = np.repeat(np.arange(4), 40)[np.random.default_rng(0).permutation(160)]
    hits = np.zeros(160, dtype=int)
    for seed in range(400):
        hits[stratified_subset(labels, 0.25, seed)] += 1
    assert hits.sum() == 400 * 40
    assert 55 <= hits.min() and hits.max() <= 145  # > 5 sd either side


@pytest.mark.parametrize("fraction, n, k", [(0.29, 50, 15), (0.7, 45, 32), (0.35, 90, 32), (0.58, 25, 15)])
def test_decimal_fractions_round_half_up(fraction, n, k):
    labels = np.zeros(n, dtype=np.int64)
    assert len(stratified_subset(labels, fraction, seed=0)) == k

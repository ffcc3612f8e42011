"""Tests for dyrep_jax.data: sources, determinism, resume, multi-host sharding, augmentation."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dyrep_jax.data import (
    DataError,
    augment_on_device,
    build_input,
    normalize_images,
    sampling,
    warp_ops,
)
from dyrep_jax.data.engines import thread_batches
from dyrep_jax.data.host_augment import make_eval_transform, make_train_transform
from dyrep_jax.data.randaugment import RAND_OPS, rand_augment, random_erasing

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- helpers


def write_npz(path: Path, n_train=100, n_test=37, shape=(8, 8, 3), **overrides) -> str:
    """An npz whose label is the example id, so batches reveal exactly which examples they hold."""
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
        "y_train": np.arange(n_train, dtype=np.int64),
        "x_test": rng.integers(0, 256, (n_test, *shape), dtype=np.uint8),
        "y_test": np.arange(n_test, dtype=np.int64),
    }
    arrays.update(overrides)
    arrays = {key: value for key, value in arrays.items() if value is not None}
    np.savez(path, **arrays)
    return str(path)


@pytest.fixture
def id_npz(tmp_path) -> str:
    return write_npz(tmp_path / "ids.npz")


def build(name, **kwargs):
    kwargs.setdefault("global_batch_size", 16)
    kwargs.setdefault("eval_batch_size", 16)
    kwargs.setdefault("seed", 0)
    return build_input(name, **kwargs)


def epoch_batches(inp, epoch=0, start_step=0):
    return list(inp.train_iter(epoch, start_step=start_step))


def assert_same_batches(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def constant_images(value, count=64, size=32, channels=3):
    return np.full((count, size, size, channels), value, np.uint8)


# ----------------------------------------------------------------------------- sources


def test_digits_shapes_dtypes_and_fixed_split():
    inp = build("digits", global_batch_size=64, eval_batch_size=100)
    assert (inp.num_train, inp.num_test, inp.num_classes) == (1437, 360, 10)
    assert inp.image_shape == (16, 16, 1)
    assert inp.steps_per_epoch == 1437 // 64
    assert inp.mean.shape == inp.std.shape == (1,) and inp.mean.dtype == np.float32
    assert inp.device_augment == "cifar"
    batch = next(inp.train_iter(0))
    assert batch["image"].shape == (64, 16, 16, 1) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (64,) and batch["label"].dtype == np.int32
    assert batch["label"].min() >= 0 and batch["label"].max() < 10
    assert batch["image"].max() > 200  # scaled from 0..16 to 0..255
    again = build("digits", global_batch_size=64, eval_batch_size=100, seed=5)
    np.testing.assert_array_equal(
        np.concatenate([b["label"] for b in inp.eval_iter()]),
        np.concatenate([b["label"] for b in again.eval_iter()]),
    )


def test_synthetic_source_and_bad_spec():
    inp = build("synthetic:12,10,2,5,50,20", global_batch_size=8, eval_batch_size=8)
    assert inp.image_shape == (12, 10, 2) and inp.num_classes == 5
    assert (inp.num_train, inp.num_test, inp.steps_per_epoch) == (50, 20, 6)
    batch = next(inp.train_iter(0))
    assert batch["image"].shape == (8, 12, 10, 2)
    assert 0 <= batch["label"].min() and batch["label"].max() < 5
    with pytest.raises(DataError, match="synthetic"):
        build("synthetic:32,32,3")


def test_npz_source(tmp_path):
    path = write_npz(tmp_path / "d.npz", n_train=40, n_test=10, shape=(6, 5, 3))
    inp = build("npz:" + path, global_batch_size=8, eval_batch_size=4)
    assert inp.image_shape == (6, 5, 3)
    assert inp.num_classes == 40  # max label + 1 over both splits
    assert inp.mean.shape == (3,) and np.all(inp.std > 0)
    batch = next(inp.train_iter(0))
    assert batch["image"].dtype == np.uint8 and batch["label"].dtype == np.int32


def test_npz_accepts_keras_style_column_labels(tmp_path):
    path = write_npz(tmp_path / "k.npz", y_train=np.arange(100).reshape(100, 1))
    assert build("npz:" + path).num_train == 100


@pytest.mark.parametrize(
    "overrides, key, expected",
    [
        ({"y_test": None}, "y_test", "missing key"),
        ({"x_train": np.zeros((100, 8, 8, 3), np.float32)}, "x_train", "uint8"),
        ({"x_test": np.zeros((37, 8, 8), np.uint8)}, "x_test", "rank 4"),
        ({"y_train": np.arange(99)}, "y_train", "one label per image"),
        ({"y_test": np.zeros(37, np.float32)}, "y_test", "integer labels"),
    ],
)
def test_malformed_npz_names_file_and_key(tmp_path, overrides, key, expected):
    path = write_npz(tmp_path / "bad.npz", **overrides)
    with pytest.raises(DataError, match=expected) as info:
        build("npz:" + path)
    assert key in str(info.value) and "bad.npz" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_missing_or_unreadable_npz_file(tmp_path):
    with pytest.raises(DataError, match="does not exist") as info:
        build(f"npz:{tmp_path}/nope.npz")
    assert "nope.npz" in str(info.value)
    (tmp_path / "junk.npz").write_text("not an archive")
    with pytest.raises(DataError, match="not a readable .npz") as info:
        build(f"npz:{tmp_path}/junk.npz")
    assert "junk.npz" in str(info.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"augment": "autoaugment"}, "augment"),
        ({"global_batch_size": 15, "process_count": 2}, "divisible"),
        ({"eval_batch_size": 15, "process_count": 2}, "divisible"),
        ({"process_index": 2, "process_count": 2}, "process_index"),
        ({"global_batch_size": 128}, "fewer than one global batch"),
        ({"max_train_examples": 0}, "max_train_examples"),
    ],
)
def test_bad_arguments(id_npz, kwargs, message):
    with pytest.raises(DataError, match=message):
        build("npz:" + id_npz, **kwargs)


def test_unknown_dataset_name():
    with pytest.raises(DataError, match="unknown dataset"):
        build("mnist")


def test_truncation_keeps_first_examples(id_npz):
    inp = build("npz:" + id_npz, max_train_examples=50, max_test_examples=10)
    assert (inp.num_train, inp.num_test, inp.steps_per_epoch) == (50, 10, 3)
    seen = np.concatenate([b["label"] for b in inp.train_iter(0)])
    assert seen.max() < 50
    evaluated = np.concatenate([b["label"][b["mask"]] for b in inp.eval_iter()])
    np.testing.assert_array_equal(evaluated, np.arange(10))


# ----------------------------------------------------------------------------- determinism


def test_same_seed_same_batches_other_seed_or_epoch_differs(id_npz):
    first = epoch_batches(build("npz:" + id_npz, seed=3))
    assert_same_batches(first, epoch_batches(build("npz:" + id_npz, seed=3)))
    other_seed = epoch_batches(build("npz:" + id_npz, seed=4))
    other_epoch = epoch_batches(build("npz:" + id_npz, seed=3), epoch=1)
    order = np.concatenate([b["label"] for b in first])
    assert not np.array_equal(order, np.concatenate([b["label"] for b in other_seed]))
    assert not np.array_equal(order, np.concatenate([b["label"] for b in other_epoch]))


@pytest.mark.parametrize("augment", ["cifar", "imagenet", "imagenet_strong"])
def test_resume_yields_the_same_remaining_batches(id_npz, augment):
    kwargs = {"augment": augment, "image_size": 6 if augment != "cifar" else None}
    full = epoch_batches(build("npz:" + id_npz, **kwargs), epoch=2)
    assert len(full) == 6
    for start in (0, 1, 4, 6):
        resumed = epoch_batches(build("npz:" + id_npz, **kwargs), 2, start)
        assert_same_batches(full[start:], resumed)


def test_host_augmented_epochs_differ_but_repeat(id_npz):
    inp = build("npz:" + id_npz, augment="imagenet", image_size=8)
    epoch0 = epoch_batches(inp, 0)
    assert_same_batches(epoch0, epoch_batches(inp, 0))
    assert not np.array_equal(epoch0[0]["image"], epoch_batches(inp, 1)[0]["image"])


# ----------------------------------------------------------------------------- sharding


def test_epoch_visits_each_example_once(id_npz):
    inp = build("npz:" + id_npz, global_batch_size=16)
    seen = np.concatenate([b["label"] for b in inp.train_iter(0)])
    assert len(seen) == inp.steps_per_epoch * 16 == 96
    assert len(np.unique(seen)) == len(seen)


@pytest.mark.parametrize("augment", ["cifar", "imagenet"])
def test_two_processes_split_every_global_batch(id_npz, augment):
    kwargs = {"global_batch_size": 16, "eval_batch_size": 10, "augment": augment, "image_size": 8}
    single = epoch_batches(build("npz:" + id_npz, **kwargs), epoch=1)
    shards = [
        epoch_batches(build("npz:" + id_npz, process_index=i, process_count=2, **kwargs), 1)
        for i in range(2)
    ]
    for step, whole in enumerate(single):
        for key in ("image", "label"):
            joined = np.concatenate([shards[0][step][key], shards[1][step][key]])
            np.testing.assert_array_equal(joined, whole[key])
    labels = np.concatenate([b["label"] for shard in shards for b in shard])
    assert len(labels) == 96 and len(np.unique(labels)) == 96


def test_eval_covers_each_test_example_once_across_processes(id_npz):
    seen = []
    for index in range(2):
        inp = build("npz:" + id_npz, eval_batch_size=10, process_index=index, process_count=2)
        batches = list(inp.eval_iter())
        assert len(batches) == inp.num_eval_steps == 4  # same count on every process
        for batch in batches:
            assert batch["image"].shape == (5, 8, 8, 3) and batch["mask"].dtype == bool
            assert not batch["image"][~batch["mask"]].any()  # padding rows are zeros
            seen.append(batch["label"][batch["mask"]])
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(37))


@settings(max_examples=60, deadline=None)
@given(
    num=st.integers(1, 300),
    local=st.integers(1, 9),
    procs=st.integers(1, 4),
    seed=st.integers(-5, 5),
)
def test_sampling_partitions_properties(num, local, procs, seed):
    global_batch = local * procs
    steps = num // global_batch
    perm = sampling.epoch_permutation(seed, 0, num)
    parts = [sampling.train_indices(perm, global_batch, 0, steps, p, procs) for p in range(procs)]
    train = np.concatenate([part.reshape(-1) for part in parts])
    assert len(train) == steps * global_batch and len(np.unique(train)) == len(train)
    evals = [sampling.eval_indices(num, global_batch, p, procs) for p in range(procs)]
    assert len({e.shape for e in evals}) == 1
    flat = np.concatenate([e.reshape(-1) for e in evals])
    np.testing.assert_array_equal(np.sort(flat[flat != sampling.PAD]), np.arange(num))


# ----------------------------------------------------------------------------- TFDS


@pytest.fixture
def tfds():
    tfds = pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("grain")
    return tfds


def test_tfds_cifar10_through_data_source(tfds):
    # tfds 4.9.10's mock_data patches tfds.data_source too (policy AUTO: random examples
    # from the feature spec, no files, no TensorFlow). Its mock source's __getitems__ is
    # broken, which is one reason the pipeline reads records one by one with __getitem__.
    with tfds.testing.mock_data(num_examples=40):
        inp = build("cifar10", global_batch_size=8, eval_batch_size=16)
        other_process = build("cifar10", global_batch_size=8, eval_batch_size=16,
                              process_index=1, process_count=2)
        again = build("cifar10", global_batch_size=8, eval_batch_size=16)
    assert (inp.num_classes, inp.image_shape, inp.num_train, inp.num_test) == (10, (32, 32, 3), 40, 40)
    np.testing.assert_allclose(inp.mean, (0.4914, 0.4822, 0.4465))
    batches = epoch_batches(inp)
    assert len(batches) == 5 and batches[0]["image"].dtype == np.uint8
    assert batches[0]["image"].shape == (8, 32, 32, 3) and batches[0]["label"].max() < 10
    assert_same_batches(batches, epoch_batches(again))
    assert_same_batches(batches[2:], epoch_batches(inp, 0, 2))
    np.testing.assert_array_equal(next(other_process.train_iter(0))["image"], batches[0]["image"][4:])
    assert sum(int(b["mask"].sum()) for b in inp.eval_iter()) == 40


@pytest.fixture(scope="module")
def jpeg_set(tmp_path_factory):
    """A real local imagenet2012 (24 + 24 synthetic JPEGs) written by make_jpeg_set.py."""
    pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("grain")
    spec = importlib.util.spec_from_file_location(
        "make_jpeg_set", REPO / "experiments" / "make_jpeg_set.py")
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    out = str(tmp_path_factory.mktemp("jpeg"))
    maker.main(["--out", out, "--train", "24", "--validation", "24"])
    return out


def test_tfds_imagenet_streams_variable_size_jpegs(jpeg_set):
    inp = build("imagenet2012", data_dir=jpeg_set, global_batch_size=8, eval_batch_size=16,
                augment="imagenet", image_size=24, color_jitter=0.4)
    assert inp.image_shape == (24, 24, 3) and inp.num_classes == 1000
    np.testing.assert_allclose(inp.std, (0.229, 0.224, 0.225))
    image, _ = inp.train.example(0)
    assert image.dtype == np.uint8 and image.shape[2] == 3 and 320 <= image.shape[0] < 380
    batches = epoch_batches(inp)
    assert [b["image"].shape for b in batches] == [(8, 24, 24, 3)] * 3
    assert_same_batches(batches[1:], epoch_batches(inp, 0, 1))
    evals = list(inp.eval_iter())
    assert [int(b["mask"].sum()) for b in evals] == [16, 8]
    assert evals[0]["image"].shape == (16, 24, 24, 3)
    workers = build("imagenet2012", data_dir=jpeg_set, global_batch_size=8, eval_batch_size=16,
                    augment="imagenet", image_size=24, color_jitter=0.4, host_workers=2)
    assert_same_batches(epoch_batches(workers, 0, 1), batches[1:])  # processes: same batches
    head = build("imagenet2012", data_dir=jpeg_set, global_batch_size=8, augment="imagenet",
                 image_size=24, max_train_examples=16)
    assert [b["image"].shape for b in epoch_batches(head)] == [(8, 24, 24, 3)] * 2


def test_decoding_ourselves_gives_tfds_pixels(jpeg_set, tfds):
    decoded_by_tfds = tfds.data_source("imagenet2012", split="train", data_dir=jpeg_set)
    inp = build("imagenet2012", data_dir=jpeg_set, global_batch_size=8, augment="imagenet",
                image_size=24)
    for index in (0, 5):
        np.testing.assert_array_equal(inp.train.example(index)[0],
                                      decoded_by_tfds[index]["image"])


def test_unprepared_tfds_dataset_gives_one_clear_error(tfds, tmp_path, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_download)
    with pytest.raises(DataError) as info:
        build("cifar10", data_dir=str(tmp_path))
    message = str(info.value)
    for needle in ("'cifar10'", "TFDS_DATA_DIR", "npz:", "download_and_prepare", str(tmp_path)):
        assert needle in message


def test_data_dir_falls_back_to_env(tfds, tmp_path, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError, match=str(tmp_path)):
        build("cifar100")


# ----------------------------------------------------------------------------- label range


@pytest.mark.parametrize("y_train, num_classes, found", [
    (np.arange(100) - 1, None, "-1..98"),  # a negative label
    (np.arange(100), 40, "0..99"),  # more classes in the data than the model has
])
def test_npz_labels_outside_the_class_range_are_refused(tmp_path, y_train, num_classes, found):
    path = write_npz(tmp_path / "labels.npz", y_train=y_train)
    with pytest.raises(DataError, match="labels span " + found) as info:
        build("npz:" + path, num_classes=num_classes)
    message = str(info.value)
    assert "\n" not in message and "model.num_classes" in message and "labels.npz" in message


@pytest.mark.parametrize("name", ["digits", "synthetic:8,8,3,10,64,16"])
def test_labels_beyond_the_models_classes_are_refused(name):
    assert build(name, num_classes=10).num_classes == 10
    with pytest.raises(DataError, match=r"labels span 0\.\.9 but must lie in \[0, 5\)"):
        build(name, num_classes=5)


def test_tfds_labels_checked_at_load_and_as_streamed(tfds, jpeg_set):
    with tfds.testing.mock_data(num_examples=24):
        with pytest.raises(DataError, match=r"cifar10 \(train split\): labels span 0\.\.\d"):
            build("cifar10", global_batch_size=8, num_classes=1)  # cached arrays: every label
    with pytest.raises(DataError, match=r"metadata\): labels span 0\.\.999 .* \[0, 10\)"):
        build("imagenet2012", data_dir=jpeg_set, global_batch_size=8, augment="imagenet",
              image_size=8, num_classes=10)  # streamed: the dataset's class count
    inp = build("imagenet2012", data_dir=jpeg_set, global_batch_size=8, augment="imagenet",
                image_size=8)
    bad = type("BadLabels", (), {"__len__": lambda self: 24,
                                 "example": lambda self, i: (np.zeros((9, 9, 3), np.uint8), 1000)})
    with pytest.raises(DataError, match=r"labels span 1000\.\.1000"):
        next(dataclasses.replace(inp, train=bad()).train_iter(0))  # and each label as read


# ----------------------------------------------------------------------------- device augmentation


def test_normalize_images_formula():
    images = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    mean, std = np.array([0.1, 0.2, 0.3]), np.array([0.5, 0.25, 2.0])
    out = np.asarray(normalize_images(images, mean, std))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, (images / 255.0 - mean) / std, rtol=1e-5, atol=1e-6)


def test_augment_none_is_normalization_only():
    import jax

    images = constant_images(77, count=4)
    out = augment_on_device(jax.random.key(0), images, [0.5] * 3, [0.2] * 3, kind="none")
    np.testing.assert_allclose(out, normalize_images(images, [0.5] * 3, [0.2] * 3))


def test_cifar_augment_shapes_ranges_and_per_example_randomness():
    import jax

    mean, std = np.array([0.4914, 0.4822, 0.4465]), np.array([0.2470, 0.2435, 0.2616])
    images = np.random.default_rng(1).integers(0, 256, (32, 32, 32, 3), dtype=np.uint8)
    augment = jax.jit(augment_on_device, static_argnames="kind")
    out = np.asarray(augment(jax.random.key(0), images, mean, std, kind="cifar"))
    assert out.shape == images.shape and out.dtype == np.float32
    assert out.min() >= (0 - mean.max()) / std.min() - 1e-5
    assert out.max() <= (1 - mean.min()) / std.min() + 1e-5
    same = np.repeat(images[:1], 32, axis=0)
    varied = np.asarray(augment(jax.random.key(1), same, mean, std, kind="cifar"))
    assert len({row.tobytes() for row in varied}) > 1
    again = np.asarray(augment(jax.random.key(1), same, mean, std, kind="cifar"))
    np.testing.assert_array_equal(varied, again)


def test_cutout_zeroes_one_clipped_square_after_normalization():
    import jax

    # White image, mean 0, std 1: every pixel normalizes to 1, so zeros are exactly the cutout.
    augment = jax.jit(augment_on_device, static_argnames=("kind", "padding", "cutout_size"))
    out = augment(jax.random.key(3), constant_images(255, count=200), [0.0] * 3, [1.0] * 3,
                  kind="cifar", padding=0, cutout_size=16)
    out = np.asarray(out)
    assert set(np.unique(out)) <= {0.0, 1.0}
    full_squares = 0
    for image in out:
        zero = image[..., 0] == 0
        assert np.array_equal(zero, image[..., 1] == 0)  # all channels together
        rows, cols = np.flatnonzero(zero.any(1)), np.flatnonzero(zero.any(0))
        assert 8 <= len(rows) <= 16 and 8 <= len(cols) <= 16  # centre inside the image
        assert zero.sum() == len(rows) * len(cols)  # one solid rectangle
        assert rows[-1] - rows[0] + 1 == len(rows) and cols[-1] - cols[0] + 1 == len(cols)
        full_squares += zero.sum() == 256
    assert full_squares > 25  # ~28% of centres (8 <= cy, cx <= 24) give the whole 16x16 square


def test_random_crop_pads_with_black_pixels():
    import jax

    augment = jax.jit(augment_on_device, static_argnames=("kind", "padding", "cutout_size"))
    out = augment(jax.random.key(4), constant_images(255, count=100), [0.0] * 3, [1.0] * 3,
                  kind="cifar", padding=4, cutout_size=0)
    zero = np.asarray(out)[..., 0] == 0
    assert zero.any() and not zero.all(axis=(1, 2)).any()
    widths = zero.all(axis=1).sum(axis=1)  # zero columns per image (the shifted-in padding)
    assert widths.max() <= 4


# ----------------------------------------------------------------------------- host augmentation


@pytest.mark.parametrize("kind", ["imagenet", "imagenet_strong"])
@pytest.mark.parametrize("channels", [3, 1])
def test_host_train_transform_shape_dtype_determinism(kind, channels):
    image = np.random.default_rng(0).integers(0, 256, (37, 53, channels), dtype=np.uint8)
    transform = make_train_transform(kind, (20, 24), 0.4, 0.2, [0.5] * channels, [0.25] * channels)
    outs = [transform(image, np.random.default_rng(seed)) for seed in (7, 7, 8)]
    assert outs[0].shape == (20, 24, channels) and outs[0].dtype == np.uint8
    np.testing.assert_array_equal(outs[0], outs[1])
    assert not np.array_equal(outs[0], outs[2])


def test_eval_transform_resizes_shorter_side_then_centre_crops():
    image = np.zeros((100, 200, 3), np.uint8)
    image[:, 90:110] = 255  # a centred bar survives the centre crop
    out = make_eval_transform((32, 32))(image)
    assert out.shape == (32, 32, 3)
    assert out[:, 16].min() > 200 and out[:, 0].max() < 50


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_every_rand_augment_op_keeps_size_and_mode(mode):
    from PIL import Image

    image = Image.fromarray(
        np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    ).convert(mode)
    for name, op in RAND_OPS.items():
        result = op(image, 9.0, np.random.default_rng(0))
        assert result.size == image.size and result.mode == mode, name


def test_random_erasing_fills_one_rectangle():
    image = np.zeros((40, 40, 3), np.uint8)
    out = random_erasing(image, np.random.default_rng(0), [0.5] * 3, [0.25] * 3, prob=1.0)
    changed = out.any(axis=-1)
    rows, cols = np.flatnonzero(changed.any(1)), np.flatnonzero(changed.any(0))
    assert 0 < changed.sum() <= len(rows) * len(cols) < 40 * 40
    assert image.sum() == 0  # input untouched
    assert random_erasing(image, np.random.default_rng(0), [0.5] * 3, [0.25] * 3, prob=0.0) is image


# ----------------------------------------------------------------------------- engines, packaging


def test_thread_and_grain_engines_agree():
    grain_engine = pytest.importorskip("dyrep_jax.data.engines").grain_batches
    pytest.importorskip("grain")

    def load(index):
        return np.full((2, 2, 1), index, np.uint8), index * 3

    indices = np.random.default_rng(0).permutation(50)
    by_threads = list(thread_batches(load, indices, 8, num_threads=4))
    by_grain = list(grain_engine(load, indices, 8, num_threads=4))
    assert len(by_threads) == len(by_grain) == 7
    for (ti, tl), (gi, gl) in zip(by_threads, by_grain, strict=True):
        np.testing.assert_array_equal(ti, gi)
        np.testing.assert_array_equal(tl, gl)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in by_threads]), indices * 3)


def test_local_paths_work_without_tfds_or_grain(id_npz):
    # As on the GPU machine: no tensorflow-datasets, no grain; and PIL only for host augments.
    script = f"""
import sys
for blocked in ('tensorflow_datasets', 'grain', 'tensorflow', 'PIL'):
    sys.modules[blocked] = None  # makes `import blocked` fail
from dyrep_jax.data import build_input, DataError
names = ('digits', 'npz:{id_npz}', 'synthetic:8,8,3,4,64,16')
for name in names:
    inp = build_input(name, global_batch_size=16, eval_batch_size=16, seed=0, augment='cifar')
    next(inp.train_iter(0)); next(inp.eval_iter())
del sys.modules['PIL']
for name in names:
    inp = build_input(name, global_batch_size=16, eval_batch_size=16, seed=0, augment='imagenet',
                      image_size=8)
    next(inp.train_iter(0)); next(inp.eval_iter())
try:
    build_input('cifar10', global_batch_size=16, eval_batch_size=16, seed=0)
except DataError as err:
    assert 'npz:' in str(err) and 'pip install' in str(err)
else:
    raise SystemExit('expected DataError')
"""
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_bench_input_tiny_runs():
    spec = importlib.util.spec_from_file_location("bench_input", REPO / "experiments" / "bench_input.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--tiny", "--device-aug", "--steps", "5"])
    assert result["host_images_per_s"] > 0 and result["device_aug_images_per_s"] > 0


# ----------------------------------------------------------------------------- reference recipe ops

REFERENCE_RAND_OPS = (  # the DyRep reference's _RAND_TRANSFORMS, in its order
    "Distort", "Zoom", "Blur", "Skew", "AutoContrast", "Equalize", "Invert", "Rotate",
    "PosterizeTpu", "Solarize", "SolarizeAdd", "Color", "Contrast", "Brightness", "Sharpness",
    "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)


def test_rand_augment_uses_the_reference_19_ops_with_unclipped_magnitude(monkeypatch):
    from PIL import Image

    assert tuple(RAND_OPS) == REFERENCE_RAND_OPS
    levels, names = [], set()
    for name in RAND_OPS:
        monkeypatch.setitem(RAND_OPS, name, lambda im, level, rng, name=name:
                            (levels.append(level), names.add(name), im)[2])
    image = Image.new("RGB", (8, 8))
    rng = np.random.default_rng(0)
    for _ in range(400):
        rand_augment(image, rng, magnitude=9.0, magnitude_std=3.0)
    assert names == set(REFERENCE_RAND_OPS)  # every op is drawn
    assert max(levels) > 10 and min(levels) < 0  # N(9, std) is not clipped to [0, 10]
    assert 0.4 < len(levels) / 800 < 0.6  # each drawn op applied with probability 0.5


def test_distort_moves_the_inner_grid_vertex_only_from_level_10():
    from PIL import Image

    image = Image.fromarray(np.arange(40 * 40, dtype=np.uint16).reshape(40, 40).astype(np.uint8))
    grid = np.asarray(image, np.int32)
    below = np.asarray(warp_ops.distort(image, 9.9, None), np.int32)  # one tile: near identity
    assert np.abs(below - grid).mean() < 2
    warped = np.asarray(warp_ops.distort(image, 10.0, None), np.int32)  # 2x2 tiles, shift 20
    # the inner vertex (20, 20) of the output samples the input at (40, 40): far from identity
    assert np.abs(warped - grid)[10:30, 10:30].mean() > 20


def test_skew_coefficients_send_pushed_corners_to_the_image_corners():
    width, height, shift = 30, 20, 7
    a, b, c, d, e, f, g, h = warp_ops.skew_coefficients(width, height, shift)
    pushed = [(-shift, 0), (width, -shift), (width + shift, height), (0, height + shift)]
    corners = [(0, 0), (width, 0), (width, height), (0, height)]
    for (x, y), (u, v) in zip(pushed, corners, strict=True):  # PIL's perspective formula
        denominator = g * x + h * y + 1
        assert (a * x + b * y + c) / denominator == pytest.approx(u, abs=1e-9)
        assert (d * x + e * y + f) / denominator == pytest.approx(v, abs=1e-9)


def test_zoom_shrinks_into_a_black_frame_and_posterize_zero_bits_is_black():
    from PIL import Image

    from dyrep_jax.data.randaugment import _posterize

    image = Image.new("RGB", (41, 30), (200, 200, 200))
    zoomed = np.asarray(warp_ops.zoom(image, 9.0, None))  # factor 0.36
    assert zoomed.shape == (30, 41, 3) and zoomed[0, 0].max() == 0
    assert zoomed[15, 20].min() > 150  # the shrunken image sits in the centre
    assert np.asarray(_posterize(image, 1.0, None)).max() == 0


@pytest.mark.parametrize("kind", ["imagenet", "imagenet_strong"])
def test_random_erasing_probability_and_per_pixel_noise(kind):
    image = np.full((40, 40, 3), 255, np.uint8)
    mean, std = [0.5] * 3, [0.25] * 3
    erased = make_train_transform(kind, (32, 32), 0.0, 1.0, mean, std)
    never = make_train_transform(kind, (32, 32), 0.0, 0.0, mean, std)
    seeds = range(20)
    hits = [erased(image, np.random.default_rng(s)) < 250 for s in seeds]
    if kind == "imagenet":  # crop + flip of a constant image: only erasing changes pixels
        assert all(hit.any() for hit in hits)
        assert not any((never(image, np.random.default_rng(s)) < 250).any() for s in seeds)
    box = erased(image, np.random.default_rng(0))[hits[0].any(-1)]
    assert len(np.unique(box)) > 20  # per-pixel noise, not one colour


def test_color_jitter_strength_is_a_parameter_and_zero_is_off():
    image = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    stats = [0.5] * 3, [0.25] * 3
    plain = make_train_transform("imagenet", (32, 32), 0.0, 0.0, *stats)
    jitter = make_train_transform("imagenet", (32, 32), 0.4, 0.0, *stats)
    seed = np.random.default_rng
    assert not np.array_equal(plain(image, seed(1)), jitter(image, seed(1)))
    with pytest.raises(DataError, match="color_jitter"):
        build("digits", augment="imagenet", color_jitter=-0.1)
    with pytest.raises(DataError, match="random_erasing"):
        build("digits", augment="imagenet", random_erasing=1.5)


def test_one_example_followed_across_epochs_and_a_resume(id_npz):
    """Example 5's pixels: new each epoch, identical when the epoch is resumed mid-way."""
    kwargs = {"augment": "imagenet", "image_size": 8, "color_jitter": 0.4, "random_erasing": 0.5}

    def find(batches, example):
        for step, batch in enumerate(batches):
            rows = np.flatnonzero(batch["label"] == example)
            if rows.size:
                return step, batch["image"][rows[0]]
        raise AssertionError(f"example {example} not in the epoch")

    inp = build("npz:" + id_npz, **kwargs)
    example = 5
    _, in_epoch0 = find(epoch_batches(inp, 0), example)
    step, in_epoch1 = find(epoch_batches(inp, 1), example)
    assert not np.array_equal(in_epoch0, in_epoch1)  # the augmentation seed follows the epoch
    resumed = build("npz:" + id_npz, **kwargs)  # a fresh process resuming epoch 1 at `step`
    resumed_step, again = find(epoch_batches(resumed, 1, start_step=step), example)
    assert resumed_step == 0
    np.testing.assert_array_equal(again, in_epoch1)


def test_process_workers_give_todays_batches_and_resume_exactly(id_npz):
    pytest.importorskip("grain")
    kwargs = {"augment": "imagenet_strong", "image_size": 8, "random_erasing": 0.5}
    threads = epoch_batches(build("npz:" + id_npz, **kwargs), epoch=1)
    workers = build("npz:" + id_npz, host_workers=2, **kwargs)
    assert_same_batches(epoch_batches(workers, epoch=1), threads)
    assert_same_batches(epoch_batches(workers, epoch=1, start_step=4), threads[4:])
    with pytest.raises(DataError, match="host_workers"):
        build("npz:" + id_npz, host_workers=-1, **kwargs)

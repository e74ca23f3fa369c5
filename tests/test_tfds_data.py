"""tfds datasets through grain (without TensorFlow), precomputed latents, and the recipes.

Most tfds tests run on ``tfds.testing.mock_data(policy=MockPolicy.USE_CODE)``: the real
``tfds.data_source`` / ``ArrayRecordDataSource`` path with generated records in place of the
ArrayRecord reader (``USE_FILES`` would need the dataset's metadata files). One test writes
a small image dataset to real ArrayRecord files with tfds's own builder API (PNG encoded
by PIL) and reads it back. The tfds tests are skipped without the ``tfds`` extra; the
latent and recipe tests are not.
"""

import importlib
import sys

import jax
import numpy as np
import pytest

from difflax.data import make_dataset
from difflax.data.latents import LatentDataset
from difflax.train import builders

NUM_EXAMPLES = 40  # records in the mocked splits: 5 batches of 8 per epoch


def _mocked():
    """tfds's mock data (records made by code); a data source made inside stays readable after."""
    tfds = pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("grain")
    return tfds.testing.mock_data(num_examples=NUM_EXAMPLES, policy=tfds.testing.MockPolicy.USE_CODE)


@pytest.fixture(scope="module")
def cifars():
    from difflax.data.tfds import TfdsDataset

    with _mocked():
        return (
            TfdsDataset("cifar10", "train"),
            TfdsDataset("cifar10", "train", flip=False),
            TfdsDataset("cifar10", "train", flip=False, prefetch=False),
        )


@pytest.fixture
def cifar(cifars):
    return cifars[0]


@pytest.fixture
def cifar_noflip(cifars):
    return cifars[1]


def _to_uint8(x):
    return np.rint((x + 1.0) * 127.5).astype(np.uint8)


# ---------------------------------------------------------------------------------------- tfds


def test_batch_shapes_dtypes_range(cifar):
    assert cifar.example_shape == (32, 32, 3)
    assert cifar.num_classes == 10
    assert len(cifar) == NUM_EXAMPLES
    batch = cifar.batch(0, 0, 8)
    assert batch["x"].shape == (8, 32, 32, 3) and batch["x"].dtype == np.float32
    assert batch["y"].shape == (8,) and batch["y"].dtype == np.int32
    assert batch["x"].min() >= -1.0 and batch["x"].max() <= 1.0
    assert np.all((batch["y"] >= 0) & (batch["y"] < 10))
    # exactly the source's pixels, rescaled
    np.testing.assert_allclose((batch["x"] + 1.0) * 127.5, _to_uint8(batch["x"]), atol=1e-3)


def test_batch_is_a_function_of_seed_and_step(cifar):
    a, b = cifar.batch(3, 7, 8), cifar.batch(3, 7, 8)
    np.testing.assert_array_equal(a["x"], b["x"])
    np.testing.assert_array_equal(a["y"], b["y"])
    assert not np.array_equal(cifar.batch(3, 8, 8)["x"], a["x"])  # next step
    assert not np.array_equal(cifar.batch(4, 7, 8)["x"], a["x"])  # other seed


def test_epochs_are_permutations_reshuffled_per_epoch(cifar_noflip):
    source = {cifar_noflip.source[i]["image"].tobytes() for i in range(NUM_EXAMPLES)}

    def epoch(seed, e):
        xs = [cifar_noflip.batch(seed, s, 8)["x"] for s in range(5 * e, 5 * e + 5)]
        return [x.tobytes() for x in _to_uint8(np.concatenate(xs))]

    first, second, other_seed = epoch(0, 0), epoch(0, 1), epoch(1, 0)
    for order in (first, second, other_seed):
        assert sorted(order) == sorted(source)  # every record once per epoch
    assert first != second and first != other_seed


def test_prefetched_batches_are_the_same(cifars):
    _, prefetching, plain = cifars
    for step in (0, 1, 2, 5, 6):  # in order, then a jump: the prefetched read is used or dropped
        got = prefetching.batch(9, step, 8)
        assert prefetching._ahead[0] == (9, step + 1, 8, 0, 1)
        np.testing.assert_array_equal(got["x"], plain.batch(9, step, 8)["x"])
        np.testing.assert_array_equal(got["y"], plain.batch(9, step, 8)["y"])
    assert plain._ahead is None


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_slices_concatenate_to_global_batch(cifar, process_count):
    step = 7  # positions 56..63 cross into the second epoch
    whole = cifar.batch(5, step, 8)
    parts = [cifar.batch(5, step, 8, p, process_count) for p in range(process_count)]
    assert all(len(part["y"]) == 8 // process_count for part in parts)
    np.testing.assert_array_equal(np.concatenate([p["x"] for p in parts]), whole["x"])
    np.testing.assert_array_equal(np.concatenate([p["y"] for p in parts]), whole["y"])
    with pytest.raises(ValueError, match="divisible"):
        cifar.batch(5, step, 6, 0, 4)


def test_flips_happen_and_are_deterministic(cifar, cifar_noflip):
    flipped = np.concatenate([cifar.batch(2, s, 8)["x"] for s in range(5)])
    plain = np.concatenate([cifar_noflip.batch(2, s, 8)["x"] for s in range(5)])
    same = np.all(flipped == plain, axis=(1, 2, 3))
    mirrored = np.all(flipped == plain[:, :, ::-1], axis=(1, 2, 3))
    assert np.all(same | mirrored)  # same order of records, each flipped or not
    assert 0 < mirrored.sum() < len(mirrored)
    again = np.concatenate([cifar.batch(2, s, 8)["x"] for s in range(5)])
    np.testing.assert_array_equal(flipped, again)


def test_grain_iterator_matches_batches_and_resumes(cifar):
    it = cifar.iterator(1, 8, start_step=2, num_threads=2)
    np.testing.assert_array_equal(next(it)["x"], cifar.batch(1, 2, 8)["x"])
    state = it.get_state()
    assert state == {"next_index": 3}  # the step of the next batch
    expected = next(it)
    np.testing.assert_array_equal(expected["x"], cifar.batch(1, 3, 8)["x"])
    resumed = cifar.iterator(1, 8, num_threads=2)
    resumed.set_state(state)
    got = next(resumed)
    np.testing.assert_array_equal(got["x"], expected["x"])
    np.testing.assert_array_equal(got["y"], expected["y"])
    # per-process iterators read their slices of the same global batches
    local = cifar.iterator(1, 8, process_index=1, process_count=2, start_step=4, num_threads=2)
    np.testing.assert_array_equal(next(local)["x"], cifar.batch(1, 4, 8, 1, 2)["x"])


def test_make_dataset_tfds_names():
    with _mocked():
        from difflax.data.tfds import TfdsDataset

        ds = make_dataset("tfds:cifar10")
        assert isinstance(ds, TfdsDataset) and ds.example_shape == (32, 32, 3) and ds.num_classes == 10
        mnist = make_dataset("tfds:mnist", "test", image_size=32)  # 28x28x1, resized
        assert mnist.example_shape == (32, 32, 1)
        x = mnist.batch(0, 0, 4)["x"]
        assert x.shape == (4, 32, 32, 1) and x.min() >= -1.0 and x.max() <= 1.0
        with pytest.raises(ValueError, match="label_key"):
            TfdsDataset("cifar10", label_key="nope")
        with pytest.raises(ValueError, match="tfds:"):
            make_dataset("tfds:")


def test_real_array_record_files(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("grain")
    from PIL import Image

    from difflax.data.tfds import TfdsDataset

    images = np.random.default_rng(0).integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)

    class DifflaxTinyImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = {
                "image": tfds.features.Image(shape=(8, 8, 3), encoding_format="png"),
                "label": tfds.features.ClassLabel(num_classes=3),
            }
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, image in enumerate(images):  # PIL images are PNG-encoded by PIL, not TensorFlow
                yield i, {"image": Image.fromarray(image), "label": i % 3}

    DifflaxTinyImages(data_dir=tmp_path, file_format="array_record").download_and_prepare()
    # not registered: read back from the prepared files alone, as a dataset built elsewhere
    ds = TfdsDataset("difflax_tiny_images", data_dir=str(tmp_path), flip=False, download=False)
    assert (ds.example_shape, ds.num_classes, len(ds)) == ((8, 8, 3), 3, 12)
    batches = [ds.batch(0, s, 4) for s in range(3)]  # one epoch
    x = _to_uint8(np.concatenate([b["x"] for b in batches]))
    y = np.concatenate([b["y"] for b in batches])
    index = {image.tobytes(): i for i, image in enumerate(images)}
    read = [index[image.tobytes()] for image in x]  # every record, decoded exactly
    assert sorted(read) == list(range(12)) and read != list(range(12))
    np.testing.assert_array_equal(y, np.asarray(read) % 3)


def test_missing_extra_names_it(monkeypatch):
    from difflax.data.tfds import import_tfds_and_grain

    monkeypatch.setitem(sys.modules, "grain", None)
    with pytest.raises(ImportError, match=r"difflax\[tfds\]"):
        import_tfds_and_grain()


# ---------------------------------------------------------------------------------------- latents


def _latents(n=24, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 4, 4, 4)).astype(np.float16), rng.integers(0, 5, n)


def test_latent_dataset_npz_and_npy_dir(tmp_path):
    latents, labels = _latents()
    np.savez(tmp_path / "lat.npz", latents=latents, labels=labels, scale=np.float32(0.5))
    folder = tmp_path / "lat"
    folder.mkdir()
    np.save(folder / "latents.npy", latents)
    np.save(folder / "labels.npy", labels)
    np.save(folder / "num_classes.npy", np.int64(7))

    ds = make_dataset(f"latents:{tmp_path / 'lat.npz'}", image_size=4)
    assert isinstance(ds, LatentDataset) and ds.example_shape == (4, 4, 4) and ds.num_classes == 5
    b = ds.batch(0, 1, 8)
    assert b["x"].dtype == np.float32 and b["y"].dtype == np.int32 and b["x"].shape == (8, 4, 4, 4)
    np.testing.assert_array_equal(ds.batch(0, 1, 8)["x"], b["x"])
    # a fresh permutation of the records per epoch, scaled as stored
    epoch = np.concatenate([ds.batch(0, s, 8)["x"] for s in range(3)])
    np.testing.assert_allclose(np.sort(epoch.reshape(24, -1), 0), np.sort(0.5 * latents.reshape(24, -1), 0))
    parts = [ds.batch(0, 4, 8, p, 4)["x"] for p in range(4)]
    np.testing.assert_array_equal(np.concatenate(parts), ds.batch(0, 4, 8)["x"])

    mapped = make_dataset(f"latents:{folder}")
    assert mapped.num_classes == 7 and isinstance(mapped.latents, np.memmap)
    flips = LatentDataset(str(folder), flip=True)
    fx, px = flips.batch(3, 0, 8)["x"], mapped.batch(3, 0, 8)["x"]
    mirrored = np.all(fx == px[:, :, ::-1], axis=(1, 2, 3)) & ~np.all(fx == px, axis=(1, 2, 3))
    assert np.all(mirrored | np.all(fx == px, axis=(1, 2, 3))) and mirrored.any()

    with pytest.raises(ValueError, match="image_size"):
        make_dataset(f"latents:{folder}", image_size=32)
    with pytest.raises(FileNotFoundError):
        make_dataset(f"latents:{tmp_path / 'missing.npz'}")


# ---------------------------------------------------------------------------------------- recipes

# recipe -> (example shape of its data, number of classes, published parameter count or None)
RECIPES = {
    "cifar10_ddpmpp": ((32, 32, 3), 10, None),
    "cifar10_edm": ((32, 32, 3), 10, None),
    "imagenet64_unet_cfg": ((64, 64, 3), 1000, 296e6),  # ADM ImageNet 64 (Dhariwal & Nichol, table 14)
    "imagenet256_dit_latent": ((32, 32, 4), 1000, 675e6),  # DiT-XL/2 (Peebles & Xie, table 4)
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_builds(recipe):
    config = importlib.import_module(f"difflax.configs.{recipe}").get_config()
    shape, num_classes, published = RECIPES[recipe]
    assert config.data.name.split(":")[0] in ("tfds", "latents")
    process = builders.build_process(config.process)
    assert process.t_max > process.t_min
    model = builders.build_model(config.model, num_classes)
    conditional = config.model.class_conditional
    params = jax.eval_shape(lambda k: builders.init_params(model, k, shape, conditional), jax.random.key(0))
    count = sum(leaf.size for leaf in jax.tree.leaves(params))
    if published is not None:
        assert abs(count - published) / published < 0.01, count
    assert config.sample.steps > 0 and config.train.batch_size > 0


def test_a_recipe_on_unprepared_data_says_how_to_prepare_it(tmp_path, monkeypatch):
    """No download is attempted; the one-line error gives the preparation command."""
    pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("grain")
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"'cifar10' is not prepared .*tfds build cifar10 "
                                                r"--file_format=array_record"):
        make_dataset("tfds:cifar10", "train", 32)

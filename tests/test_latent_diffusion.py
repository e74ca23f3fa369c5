"""Latent diffusion end to end, and the README's "Bring your PyTorch checkpoint" snippet.

Without torch: a tiny Flax ``AutoencoderKL`` exported to a diffusers-format pipeline folder encodes 64
digits (16 x 16) into a latent dataset; a batch of that dataset decodes to the images that decoding the
encoder's latents directly gives; the ``digits_latent`` recipe trains a few steps through the job, and
``sample_run`` with classifier-free guidance decodes its samples to digit-sized images and a PNG.
``difflax-train-vae`` trains a VAE on the digits whose folder the converter and the encoder read.
With the bench extra: the snippet runs on small random diffusers DiT and VAE folders.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from difflax.configs import digits_latent
from difflax.data import ArrayDataset, LatentDataset, encode_dataset, latent_decoder, load_digits
from difflax.data.arrays import epoch_indices
from difflax.data.encode import encode_images, image_dataset
from difflax.hub import convert_autoencoder_kl, save_autoencoder_kl
from difflax.models import AutoencoderKL
from difflax.train import train_and_evaluate
from difflax.train.runs import sample_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_VAE = dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                out_channels=1, scaling_factor=0.5, shift_factor=0.1)
NUM = 64


def _random_params(shapes, rng):
    """Kernels ``N(0, 1 / fan_in)``, norm scales ``1 + N(0, 0.1^2)``, biases ``N(0, 0.1^2)``, drawn by NumPy
    (nothing is compiled)."""
    def draw(path, shape):
        if len(shape.shape) > 1:
            return rng.normal(0.0, np.prod(shape.shape[:-1]) ** -0.5, shape.shape).astype(np.float32)
        mean = 1.0 if path[-1].key == "scale" else 0.0
        return rng.normal(mean, 0.1, shape.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def vae_pipeline(tmp_path_factory):
    """A pipeline root holding ``vae/``: the tiny VAE's random parameters exported as diffusers tensors."""
    model = AutoencoderKL(**TINY_VAE)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 16, 16, 1), jnp.float32))
    root = tmp_path_factory.mktemp("pipeline")
    save_autoencoder_kl(model, _random_params(shapes["params"], np.random.default_rng(0)), root / "vae")
    return root


@pytest.fixture(scope="module")
def encoded(vae_pipeline, tmp_path_factory):
    """64 train digits at 16 x 16 encoded (batches of 24: the last one partial); their images and labels."""
    images, labels = load_digits("train", size=16)
    images, labels = images[:NUM], labels[:NUM]
    out = tmp_path_factory.mktemp("latents")
    encode_dataset(ArrayDataset(images, labels), vae_pipeline, out, name="digits", split="train", batch_size=24,
                   overwrite=True)
    return out, images, labels


def test_encode_then_dataset_batch_then_decode_is_decode_of_encode(vae_pipeline, encoded):
    out, images, labels = encoded
    record = json.loads((out / "vae.json").read_text())
    assert record == {"path": str(vae_pipeline / "vae"), "scaling_factor": 0.5, "shift_factor": 0.1,
                      "posterior": "mode", "dataset": "digits", "split": "train", "image_shape": [16, 16, 1],
                      "dtype": "float32"}
    data = LatentDataset(str(out))
    assert (len(data), data.example_shape, data.num_classes, data.scale, data.shift) == (NUM, (8, 8, 4), 10, 0.5, 0.1)
    # Record j is position j of the source's stream for seed 0; the dataset reads (z - shift) * scale.
    model, params, _ = convert_autoencoder_kl(vae_pipeline)
    source = epoch_indices(0, 0, NUM, NUM)
    z, images_of_z = jax.jit(lambda x: (lambda z: (z, model.apply({"params": params}, z, method="decode")))(
        encode_images(model, params, x)))(images[source])
    np.testing.assert_allclose(data.latents, z, rtol=1e-5, atol=1e-6)
    assert np.std(z) > 0.1 and np.std(images_of_z) > 0.1  # random weights, but no degenerate code
    batch = data.batch(3, 0, 16)
    picked = epoch_indices(3, 0, 16, NUM)
    np.testing.assert_array_equal(batch["y"], labels[source[picked]])
    np.testing.assert_allclose(batch["x"], model.to_latent(z[picked]), rtol=1e-5, atol=1e-6)
    direct = images_of_z[picked]
    decoded = latent_decoder(str(out), batch_size=5)(batch["x"])  # 16 = 3 batches of 5 and a padded one
    assert decoded.shape == (16, 16, 16, 1)
    np.testing.assert_allclose(decoded, direct, rtol=1e-5, atol=1e-5)
    with pytest.raises(FileExistsError, match=r"already holds latents\.npy, labels\.npy"):
        encode_dataset(ArrayDataset(images, labels), vae_pipeline, out)


def test_float16_posterior_samples_from_the_command_line(vae_pipeline, tmp_path):
    out = tmp_path / "half"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-m", "difflax.cli.encode_latents", f"--vae={vae_pipeline}", f"--out={out}", "--num=20",
         "--image_size=16", "--batch_size=8", "--dtype=float16", "--sample"],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"latents:{out}" in result.stdout
    half = LatentDataset(str(out))
    assert half.latents.dtype == np.float16 and (len(half), half.example_shape) == (20, (8, 8, 4))
    assert json.loads((out / "vae.json").read_text())["posterior"] == "sample"
    # The first 20 of the stream of seed 0 over all train digits, each a draw from its posterior.
    images, labels = load_digits("train", size=16)
    source = epoch_indices(0, 0, 20, len(labels))
    np.testing.assert_array_equal(half.labels, labels[source])
    model, params, _ = convert_autoencoder_kl(vae_pipeline)
    posterior = jax.jit(lambda x: model.apply({"params": params}, x, method="encode"))(images[source])
    standard = (np.asarray(half.latents, np.float32) - posterior.mean) / np.exp(0.5 * posterior.logvar)
    assert np.abs(standard).max() < 6 and 0.8 < np.std(standard) < 1.2
    with pytest.raises(ValueError, match="dataset must be 'digits' or 'tfds:<tfds name>' to encode; got 'mnist'"):
        image_dataset("mnist")


def test_train_vae_job_learns_the_digits_and_its_folder_is_what_the_converter_and_encoder_read(tmp_path):
    """difflax-train-vae: the reconstruction beats the per-pixel mean image by far, the saved folder converts
    back to the same parameters, and latents encoded with it have unit variance (the fitted scaling_factor)."""
    out = tmp_path / "vae"
    result = subprocess.run(
        [sys.executable, "-m", "difflax.cli.train_vae", f"--out={out}", "--steps=200", "--batch_size=32",
         "--block_out_channels=8,16", "--norm_num_groups=4", "--learning_rate=3e-3"],
        cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rmse = float(result.stdout.split("test reconstruction RMSE ")[1].split(",")[0])
    test_images, _ = load_digits("test", size=16)
    mean_image_rmse = float(np.sqrt(np.mean(np.square(test_images - test_images.mean(axis=0)))))
    assert rmse < 0.6 * mean_image_rmse, (rmse, mean_image_rmse)
    model, params, info = convert_autoencoder_kl(out)
    assert model.block_out_channels == (8, 16) and json.loads((out / "config.json").read_text())["sample_size"] == 16
    images, labels = load_digits("train", size=16)
    latents = encode_dataset(ArrayDataset(images[:256], labels[:256]), out, tmp_path / "latents")
    x = latents.batch(0, 0, 256)["x"]
    assert 0.9 < float(np.std(x)) < 1.1 and info["scaling_factor"] == latents.scale
    with pytest.raises(FileExistsError, match="exists; save_autoencoder_kl writes a new folder"):
        save_autoencoder_kl(model, params, out)


def test_digits_latent_recipe_trains_and_samples_decode_to_images(encoded, tmp_path):
    out, _, _ = encoded
    config = digits_latent.get_config()
    config.data.name = f"latents:{out}"
    config.model.kwargs.update(hidden_size=32, depth=1, num_heads=2, frequency_dim=32)
    config.train.update(steps=4, batch_size=16, log_every=2, save_every=4, async_checkpoint=False)
    config.optim.warmup_steps = 1
    config.sample.steps = 4
    config.eval.num_samples = 20
    results = train_and_evaluate(config, str(tmp_path))
    assert results["step"] == 4 and np.isfinite(results["sliced_wasserstein"])  # scored in latent space
    paths = sample_run(str(tmp_path), guidance_scale=2.0, num=20, steps=3)
    samples = np.load(paths["npz"])
    assert samples["x"].shape == (20, 8, 8, 4) and samples["images"].shape == (20, 16, 16, 1)
    assert np.isfinite(samples["images"]).all()
    np.testing.assert_array_equal(samples["labels"], np.arange(20) % 10)
    assert Image.open(paths["png"]).size[0] > 500


# The README's snippet (between its convert-snippet markers); the test substitutes only the folders, labels,
# null class, shapes and step count.
def _readme_snippet() -> str:
    """The code block of the README between ``<!-- convert-snippet -->`` and ``<!-- /convert-snippet -->``."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("<!-- convert-snippet -->")[1].split("<!-- /convert-snippet -->")[0]
    return block.split("```python")[1].split("```")[0]


def _perturbed(torch, model, seed):
    """Every parameter moved off its initial value (DiT zero-initializes its output and modulation layers)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.mark.bench
def test_readme_convert_snippet_on_small_random_models(tmp_path):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    dit = _perturbed(torch, diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, num_embeds_ada_norm=10), 0)
    dit.save_pretrained(tmp_path / "dit" / "transformer", safe_serialization=True)
    diffusers.DDPMScheduler().save_pretrained(tmp_path / "dit" / "scheduler")
    vae = _perturbed(torch, diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=16), 1)
    vae.save_pretrained(tmp_path / "vae", safe_serialization=True)
    substitutions = {'"DiT-XL-2-256"': repr(str(tmp_path / "dit")), '"sd-vae-ft-ema"': repr(str(tmp_path / "vae")),
                     "[207, 360, 387, 974]": "[1, 7]", "null=1000": "null=10", "(4, 32, 32, 4)": "(2, 8, 8, 4)",
                     "steps=50": "steps=3"}
    code = _readme_snippet()
    for old, new in substitutions.items():
        assert code.count(old) == 1, old
        code = code.replace(old, new)
    namespace = {}
    exec(compile(code, "README convert-snippet", "exec"), namespace)
    latents, images = np.asarray(namespace["latents"]), np.asarray(namespace["images"])
    assert latents.shape == (2, 8, 8, 4) and images.shape == (2, 16, 16, 3) and np.isfinite(images).all()
    with torch.no_grad():  # diffusers decodes latents / scaling_factor the same way
        want = vae.decode(torch.from_numpy(np.array(latents.transpose(0, 3, 1, 2))) / vae.config.scaling_factor).sample
    want = want.numpy().transpose(0, 2, 3, 1)
    assert np.linalg.norm(images - want) <= 1e-5 * np.linalg.norm(want)

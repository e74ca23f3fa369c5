"""The Flax ``AutoencoderKL`` and its conversion from / to diffusers' ``AutoencoderKL``.

Without torch: shapes and the posterior, the Stable Diffusion VAE's parameter count (abstractly), a few
optimizer steps on the digits lower the loss, and conversion round trips and errors on checkpoints written
by :func:`export_autoencoder_kl`. With the bench extra: a randomly initialised diffusers model saved with
``save_pretrained`` converts to a model with the same posterior and decoder output (relative L2 <= 1e-5 in
float32), and exports back to the same tensors bit for bit.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file, save_file

from difflax.data import load_digits
from difflax.hub import ConversionError
from difflax.hub.vae import convert_autoencoder_kl, export_autoencoder_kl
from difflax.models import AutoencoderKL, DiagonalGaussian, autoencoder_loss

# The diffusers comparison's size; the tests without torch use a tinier one on 1-channel 16 x 16 digits.
SMALL = dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=8)
TINY = dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=2, norm_num_groups=4, out_channels=1)
TOL = 1e-5


def _rel_l2(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture(scope="module")
def tiny():
    """The tiny model, its initial parameters and 32 digits ``(32, 16, 16, 1)`` in [-1, 1]."""
    model = AutoencoderKL(**TINY, shift_factor=0.1)
    x = jnp.asarray(load_digits("train", size=16)[0][:32])
    # lazy_init computes only the parameters; an "rbg" key's random bits compile much faster on CPU.
    params = model.lazy_init(jax.random.key(0, impl="rbg"), jax.ShapeDtypeStruct((1, 16, 16, 1), x.dtype))["params"]
    return model, params, x


def test_shapes_and_posterior(tiny):
    model, params, x = tiny
    x_hat, posterior = jax.eval_shape(model.apply, {"params": params}, x[:2], jax.random.key(2))
    assert isinstance(posterior, DiagonalGaussian)
    assert posterior.mean.shape == posterior.logvar.shape == (2, 8, 8, 2)
    assert x_hat.shape == (2, 16, 16, 1)
    posterior = DiagonalGaussian(jnp.ones((1, 2, 2, 4)), jnp.zeros((1, 2, 2, 4)))
    z = posterior.sample(jax.random.key(2))
    assert z.shape == (1, 2, 2, 4) and not np.allclose(z, posterior.mode())
    # 1/2 sum(mean^2 + exp(logvar) - 1 - logvar) with mean = 1, logvar = 0 over 16 values.
    np.testing.assert_allclose(posterior.kl(), [8.0])
    latent = model.to_latent(z)
    np.testing.assert_allclose(latent, (z - 0.1) * 0.18215, rtol=1e-6)
    np.testing.assert_allclose(model.from_latent(latent), z, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="divisible by 2"):
        model.apply({"params": params}, x[:2, :15], method="encode")
    with pytest.raises(ValueError, match="2 channels"):
        model.apply({"params": params}, x[:2], method="decode")


def test_sd_vae_parameter_count():
    """The Stable Diffusion VAE layout has diffusers' 83,653,863 parameters; nothing is allocated."""
    model = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32))
    assert sum(leaf.size for leaf in jax.tree.leaves(shapes)) == 83_653_863


def test_training_on_digits_lowers_the_loss(tiny):
    model, params, x = tiny
    params = {"params": params}
    optimizer = optax.adam(2e-3)

    @jax.jit
    def step(params, opt_state, key):
        (loss, _), grads = jax.value_and_grad(autoencoder_loss, argnums=1, has_aux=True)(model, params, x, key)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = optimizer.init(params)
    losses = []
    for key in jax.random.split(jax.random.key(1), 20):
        params, opt_state, loss = step(params, opt_state, key)
        losses.append(float(loss))
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses


def _write(directory, config, tensors):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(directory / "diffusion_pytorch_model.safetensors"))
    return directory


@pytest.fixture
def exported(tiny, tmp_path):
    """A checkpoint directory written from the tiny Flax model: its config, tensors and directory."""
    model, params, _ = tiny
    config = {"_class_name": "AutoencoderKL", **TINY, "block_out_channels": [8, 16], "in_channels": 1,
              "shift_factor": 0.1, "sample_size": 16}
    tensors = export_autoencoder_kl(model, params)
    return config, tensors, _write(tmp_path / "vae", config, tensors)


def test_export_convert_round_trip(tiny, exported):
    _, params, _ = tiny
    _, tensors, directory = exported
    assert "encoder.mid_block.attentions.0.to_out.0.weight" in tensors
    assert tensors["encoder.conv_in.weight"].shape == (8, 1, 3, 3)
    model, converted, info = convert_autoencoder_kl(directory)
    assert info == {"scaling_factor": 0.18215, "shift_factor": 0.1, "sample_size": 16}
    jax.tree.map(np.testing.assert_array_equal, converted, params)
    again = export_autoencoder_kl(model, converted)
    assert again.keys() == tensors.keys()
    for name in tensors:
        np.testing.assert_array_equal(again[name], tensors[name], err_msg=name)


def test_legacy_attention_names(tiny, exported, tmp_path):
    _, params, _ = tiny
    config, tensors, _ = exported
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for name, value in tensors.items():
        for new, before in old.items():
            name = name.replace(f".attentions.0.{new}.", f".attentions.0.{before}.")
        legacy[name] = value
    assert "decoder.mid_block.attentions.0.proj_attn.bias" in legacy
    _, converted, _ = convert_autoencoder_kl(_write(tmp_path / "legacy", config, legacy))
    jax.tree.map(np.testing.assert_array_equal, converted, params)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda c, t: t.pop("decoder.up_blocks.1.resnets.1.conv2.weight"),
         r"'decoder.up_blocks.1.resnets.1.conv2.weight' is missing"),
        (lambda c, t: t.update({"encoder.conv_out.bias": np.zeros(5, np.float32)}),
         r"'encoder.conv_out.bias' .* shape \(5,\); the model expects \(4,\)"),
        (lambda c, t: t.update({"encoder.mid_block.resnets.2.conv1.bias": np.zeros(16, np.float32)}),
         r"not used: encoder.mid_block.resnets.2.conv1.bias; it is not of the layout"),
        (lambda c, t: c.update({"_class_name": "VQModel"}), r"'_class_name' is 'VQModel'"),
        (lambda c, t: c.update({"num_vq_embeddings": 256}),
         r"unknown AutoencoderKL config key\(s\) 'num_vq_embeddings'"),
        (lambda c, t: c.update({"up_block_types": ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]}),
         r"'up_block_types'"),
        (lambda c, t: c.update({"use_quant_conv": False}), r"not used: quant_conv.bias, quant_conv.weight;"),
    ],
    ids=["missing", "shape", "extra", "class", "unknown-key", "block-type", "config-vs-tensors"],
)
def test_bad_checkpoints_name_the_tensor_or_key(exported, tmp_path, edit, match):
    config, tensors, _ = exported
    config, tensors = dict(config), dict(tensors)
    edit(config, tensors)
    with pytest.raises(ConversionError, match=match):
        convert_autoencoder_kl(_write(tmp_path / "bad", config, tensors))


def test_export_rejects_a_foreign_tree(tiny):
    model, params, _ = tiny
    wrong = dict(params)
    wrong["decoder"] = dict(wrong["decoder"], conv_out={"kernel": jnp.zeros((3, 3, 8, 3)), "bias": jnp.zeros(1)})
    with pytest.raises(ConversionError, match=r"'decoder/conv_out/kernel' has shape \(3, 3, 8, 3\)"):
        export_autoencoder_kl(model, wrong)


@pytest.fixture(scope="module")
def diffusers_vae(tmp_path_factory):
    """A randomly initialised diffusers AutoencoderKL of the small size, saved as safetensors."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16, shift_factor=0.0609, scaling_factor=1.5305, **SMALL,
    ).eval()
    # Non-trivial norms and biases, so that every tensor's layout matters.
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    directory = tmp_path_factory.mktemp("diffusers_vae")
    vae.save_pretrained(directory, safe_serialization=True)
    return torch, vae, directory


@pytest.mark.bench
def test_matches_diffusers(diffusers_vae):
    torch, vae, directory = diffusers_vae
    model, params, info = convert_autoencoder_kl(directory)
    assert info["scaling_factor"] == 1.5305 and info["shift_factor"] == 0.0609
    x = np.random.default_rng(0).normal(size=(2, 3, 16, 16)).astype(np.float32)  # NCHW for torch
    z = np.random.default_rng(1).normal(size=(2, 4, 8, 8)).astype(np.float32)
    with torch.no_grad():
        posterior = vae.encode(torch.from_numpy(x)).latent_dist
        mean, logvar = posterior.mean.numpy(), posterior.logvar.numpy()
        decoded = vae.decode(torch.from_numpy(z)).sample.numpy()
    nhwc = lambda a: jnp.asarray(a.transpose(0, 2, 3, 1))
    ours = jax.jit(lambda x: model.apply({"params": params}, x, method="encode"))(nhwc(x))
    ours_decoded = jax.jit(lambda z: model.apply({"params": params}, z, method="decode"))(nhwc(z))
    errors = {"mean": _rel_l2(nhwc(mean), ours.mean), "logvar": _rel_l2(nhwc(logvar), ours.logvar),
              "decoded": _rel_l2(nhwc(decoded), ours_decoded)}
    assert max(errors.values()) <= TOL, errors


@pytest.mark.bench
def test_export_reproduces_the_diffusers_tensors(diffusers_vae):
    _, _, directory = diffusers_vae
    original = load_file(str(directory / "diffusion_pytorch_model.safetensors"))
    exported = export_autoencoder_kl(*convert_autoencoder_kl(directory)[:2])
    assert exported.keys() == original.keys()
    for name, value in original.items():
        assert exported[name].dtype == value.dtype, name
        np.testing.assert_array_equal(exported[name], value, err_msg=name)

"""Tests of the Flax models: shapes, conditioning, initialization, precision, training, errors.

Networks are tiny so the file runs in under a minute and a half on one CPU core (about
75 s measured); compilation, not arithmetic, is what costs. Where a test needs non-zero
outputs (the models zero-initialize their output layers) it draws all parameters with
NumPy in :func:`random_params`, which compiles nothing. For such tiny programs XLA's CPU backend optimizations cost far
more time than they save (``Module.init`` of a small U-Net compiles 4x faster without
them), so one-off calls go through :func:`fast_jit`.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import difflax
from difflax.models import (
    DIT_CONFIGS,
    DiT,
    DiTBlock,
    FeatureCritic,
    MLPResNet,
    UNet,
    dit,
    dit_config,
    fourier_features,
    sinusoidal_embedding,
)
from difflax.train.builders import make_denoiser

# Two levels, convolutional re-sampling, attention only in the middle block (the default ResBlock re-sampling
# and attention at other resolutions are covered by the shape test).
TINY_UNET = dict(
    base_channels=16,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(),
    num_heads=2,
    norm_groups=4,
    resblock_updown=False,
)
# One level (no re-sampling), attention only in the middle: for tests of conditioning and dtypes.
FLAT_UNET = dict(base_channels=8, channel_mult=(1,), num_res_blocks=1, attention_resolutions=(), norm_groups=4)
TINY_DIT = dict(patch_size=2, hidden_size=32, depth=2, num_heads=2, learn_sigma=False, num_classes=None)
TINY_MLP = dict(features=32, num_blocks=2)
OVERFIT_DIT = {**TINY_DIT, "hidden_size": 64, "num_heads": 4}


fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def random_params(module, seed, *args, **kwargs):
    """Parameters of the shapes ``module.init`` makes, drawn N(0, 0.1^2) (norm scales 1 + N(0, 0.1^2)).

    Drawn with NumPy: nothing to compile, unlike ``init`` or ``jax.random`` calls per tensor.
    """
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))["params"]
    rng = np.random.default_rng(seed)
    mean = lambda path: 1.0 if path[-1].key == "scale" else 0.0
    draw = lambda path, leaf: jnp.asarray(rng.normal(mean(path), 0.1, leaf.shape), leaf.dtype)
    return jax.tree_util.tree_map_with_path(draw, shapes)


def normal(shape, seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def rel_l2(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


@pytest.fixture(scope="module")
def digits():
    """Eight 8x8 sklearn digits (one each of 0..7) scaled to [-1, 1], NHWC."""
    from sklearn.datasets import load_digits

    data = load_digits()
    idx = [int(np.flatnonzero(data.target == d)[0]) for d in range(8)]
    return jnp.asarray(data.images[idx, :, :, None] / 8.0 - 1.0, jnp.float32)


# ----------------------------------------------------------------------------- embeddings


def test_sinusoidal_embedding():
    emb = sinusoidal_embedding(jnp.array([0.0, 3.0]), 7)
    assert emb.shape == (2, 7) and emb.dtype == jnp.float32
    np.testing.assert_array_equal(emb[0], [1, 1, 1, 0, 0, 0, 0])  # cos 0, sin 0, odd-dim pad
    np.testing.assert_allclose(emb[1, 0], np.cos(3.0), rtol=1e-6)  # first frequency is 1


def test_fourier_features_fixed_and_bounded():
    t = np.linspace(-2, 2, 5, dtype=np.float32)
    a, b = fourier_features(t, 16), fourier_features(t, 16)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a[:, :8] ** 2 + a[:, 8:] ** 2, 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="even dim"):
        fourier_features(t, 7)


def forward(model):
    """``(params, *args, **kwargs) -> model.apply({"params": params}, *args, **kwargs)`` through :func:`fast_jit`."""
    return fast_jit(lambda params, *args, **kwargs: model.apply({"params": params}, *args, **kwargs))


# ----------------------------------------------------------------------------- NumPy references
# Written from the papers and the modules' docstrings, in float64, independently of Flax: a forward
# pass of the MLP and of the DiT from the same parameter tree must agree to float32 rounding.


def _as_np(params):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), params)


def _dense(p, x):
    return x @ p["kernel"] + p["bias"]


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _layer_norm(x, eps=1e-6, p=None):
    mean = x.mean(-1, keepdims=True)
    out = (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)
    return out if p is None else out * p["scale"] + p["bias"]


def _condition_reference(p, t, batch, frequency_dim, y=None, max_period=10_000.0):
    """``Dense(SiLU(Dense([cos(t f_k), sin(t f_k)])))``, ``f_k = max_period^(-k / half)`` (DiT's
    TimestepEmbedder), plus the class row of the embedding table."""
    t = np.broadcast_to(np.asarray(t, np.float64).reshape(-1), (batch,))
    half = frequency_dim // 2
    args = t[:, None] * np.exp(-np.log(max_period) * np.arange(half) / half)
    c = _dense(p["mlp_out"], _silu(_dense(p["mlp_in"], np.concatenate([np.cos(args), np.sin(args)], axis=1))))
    if y is not None:
        c = c + p["class_embedding"]["table"]["embedding"][np.asarray(y)]
    return c


def _mlp_reference(params, x, t, y=None, frequency_dim=64):
    """MLPResNet: blocks ``h + Dense(SiLU(Dense(SiLU(LN(h) (1 + s) + b))))``, then ``Dense(SiLU(LN(h)))``."""
    p, x = _as_np(params), np.asarray(x, np.float64)
    c = _condition_reference(p["condition"], t, x.shape[0], frequency_dim, y)
    h = _dense(p["dense_in"], x.reshape(x.shape[0], -1))
    for i in range(sum(name.startswith("block") for name in p)):
        q = p[f"block{i}"]
        scale, shift = np.split(_dense(q["film"], _silu(c)), 2, axis=-1)
        u = _layer_norm(h, p=q["norm"]) * (1 + scale) + shift
        h = h + _dense(q["dense2"], _silu(_dense(q["dense1"], _silu(u))))
    return _dense(p["dense_out"], _silu(_layer_norm(h, p=p["norm_out"]))).reshape(x.shape)


def _dit_reference(params, x, t, patch, heads, y=None, frequency_dim=256):
    """DiT (Peebles & Xie 2023): patches in raster order, 2-D sin-cos positions (rows in the first
    half of the channels, columns in the second, as documented), adaLN-Zero blocks with tanh-GELU,
    the final adaLN layer, and the patches put back in place."""
    p, x = _as_np(params), np.asarray(x, np.float64)
    b, height, width, _ = x.shape
    gh, gw = height // patch, width // patch
    cells = [(i, j) for i in range(gh) for j in range(gw)]
    patch_of = lambda a, i, j: a[:, i * patch : (i + 1) * patch, j * patch : (j + 1) * patch]
    tokens = np.stack([patch_of(x, i, j).reshape(b, -1) for i, j in cells], axis=1)
    h = _dense(p["patch_embed"], tokens)
    dim = h.shape[-1]
    omega = 10_000.0 ** (-np.arange(dim // 4) / (dim // 4))
    encode = lambda pos: np.concatenate([np.sin(pos[:, None] * omega), np.cos(pos[:, None] * omega)], axis=1)
    rows, cols = np.array(cells, np.float64).T
    h = h + np.concatenate([encode(rows), encode(cols)], axis=1)
    c = _condition_reference(p["condition"], t, b, frequency_dim, y)
    modulate = lambda u, shift, scale: _layer_norm(u) * (1 + scale[:, None]) + shift[:, None]
    for i in range(sum(name.startswith("block") for name in p)):
        q = p[f"block{i}"]
        shift1, scale1, gate1, shift2, scale2, gate2 = np.split(_dense(q["adaLN_modulation"], _silu(c)), 6, axis=-1)
        qkv = _dense(q["attention"]["qkv"], modulate(h, shift1, scale1))
        qh, kh, vh = (qkv[..., n * dim : (n + 1) * dim].reshape(b, len(cells), heads, -1) for n in range(3))
        logits = np.einsum("blnd,bmnd->bnlm", qh, kh) / np.sqrt(dim // heads)
        att = np.exp(logits - logits.max(-1, keepdims=True))
        att = att / att.sum(-1, keepdims=True)
        attended = np.einsum("bnlm,bmnd->blnd", att, vh).reshape(b, len(cells), dim)
        h = h + gate1[:, None] * _dense(q["attention"]["proj"], attended)
        u = _dense(q["mlp_in"], modulate(h, shift2, scale2))
        gelu = 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u**3)))
        h = h + gate2[:, None] * _dense(q["mlp_out"], gelu)
    shift, scale = np.split(_dense(p["final_layer"]["adaLN_modulation"], _silu(c)), 2, axis=-1)
    out = _dense(p["final_layer"]["linear"], modulate(h, shift, scale))
    channels = out.shape[-1] // patch**2
    image = np.zeros((b, height, width, channels))
    for n, (i, j) in enumerate(cells):
        patch_of(image, i, j)[...] = out[:, n].reshape(b, patch, patch, -1)
    return image


@pytest.mark.parametrize(
    ("shape", "resblock_updown", "attention"), [((1, 8, 8, 1), True, (4,)), ((3, 16, 8, 3), False, (16, 8))]
)
def test_unet_output_shape(shape, resblock_updown, attention):
    """Shape, dtype, examples independent of each other, and the bfloat16 compute path.

    GroupNorm, attention and the conditioning act per example, so permuting the batch permutes the
    output and changing one example leaves the others' outputs unchanged (to float32 rounding).
    Translation equivariance does not hold: the convolutions pad with zeros.
    """
    config = {**TINY_UNET, "attention_resolutions": attention, "resblock_updown": resblock_updown}
    model = UNet(**config)
    x = normal(shape)
    t = np.linspace(0.1, 0.9, shape[0], dtype=np.float32)
    params = random_params(model, 2, x, 0.5)
    apply = forward(model)
    out = apply(params, x, t)
    assert out.shape == shape and out.dtype == jnp.float32
    assert np.isfinite(out).all()
    assert np.linalg.norm(out) > 0.1  # the random output layer is not zero
    perm = np.roll(np.arange(shape[0]), 1)
    np.testing.assert_allclose(apply(params, x[perm], t[perm]), out[perm], rtol=1e-5, atol=1e-6)
    changed = apply(params, x.at[0].multiply(-2.0), t)
    assert max_diff(changed[0], out[0]) > 1e-3
    np.testing.assert_allclose(changed[1:], out[1:], rtol=1e-5, atol=1e-6)
    low = forward(UNet(**config, dtype=jnp.bfloat16))(params, x, t)
    assert low.dtype == jnp.float32 and 0 < rel_l2(low, out) < BF16_TOLERANCE


@pytest.mark.parametrize(
    ("shape", "patch", "learn_sigma"), [((1, 8, 8, 1), 2, False), ((2, 16, 16, 3), 4, True), ((3, 8, 16, 2), 2, True)]
)
def test_dit_output_shape(shape, patch, learn_sigma):
    """Shape, and the forward pass against the NumPy reference (patch order, non-square grids, learned sigma)."""
    model = DiT(**{**TINY_DIT, "patch_size": patch, "learn_sigma": learn_sigma})
    x = normal(shape)
    params = random_params(model, 2, x, 0.5)
    out = forward(model)(params, x, 0.5)
    assert out.shape == (*shape[:3], shape[3] * (2 if learn_sigma else 1)) and out.dtype == jnp.float32
    assert np.isfinite(out).all()
    ref = _dit_reference(params, x, 0.5, patch, TINY_DIT["num_heads"])
    assert np.linalg.norm(ref) > 0.1
    assert rel_l2(out, ref) < 1e-5, rel_l2(out, ref)
    if learn_sigma:  # the bfloat16 compute path through the doubled output
        low = forward(DiT(**{**TINY_DIT, "patch_size": patch, "learn_sigma": True, "dtype": jnp.bfloat16}))
        low = low(params, x, 0.5)
        assert low.dtype == jnp.float32 and 0 < rel_l2(low, out) < BF16_TOLERANCE


@pytest.mark.parametrize("shape", [(1, 2), (4, 2), (3, 5, 3)])
def test_mlp_output_shape(shape):
    """Shape, the forward pass against the NumPy reference, and an exact zero at initialization."""
    model = MLPResNet(**TINY_MLP)
    x = np.asarray(normal(shape))
    t = np.linspace(0.2, 0.8, shape[0], dtype=np.float32)
    params = random_params(model, 0, x, 0.5)
    out = forward(model)(params, x, t)
    assert out.shape == shape and out.dtype == jnp.float32
    ref = _mlp_reference(params, x, t)
    assert np.abs(ref).max() > 0.01
    assert rel_l2(out, ref) < 1e-5, rel_l2(out, ref)
    at_init = fast_jit(lambda key: model.apply(model.init(key, x, t), x, t))(jax.random.key(0))
    np.testing.assert_array_equal(at_init, 0.0)  # zero-initialized output layer


@pytest.mark.parametrize(
    "model",
    [
        UNet(**FLAT_UNET, num_classes=4),
        DiT(**{**TINY_DIT, "num_classes": 4}),
        MLPResNet(**TINY_MLP, num_classes=4),
    ],
    ids=["unet", "dit", "mlp"],
)
def test_class_conditioning_and_null_class(model):
    shape = (3, 2) if isinstance(model, MLPResNet) else (3, 8, 8, 1)
    x = normal(shape)
    t = jnp.array([0.2, 0.5, 0.8])
    params = random_params(model, 2, x, t, np.zeros(3, np.int32))
    both = fast_jit(
        lambda p, ys: (jax.vmap(lambda y: model.apply({"params": p}, x, t, y))(ys), model.apply({"params": p}, x, t))
    )
    labelled, uncond = both(params, jnp.array([[0, 1, 2], [3, 3, 3], [4, 4, 4]]))
    cond_a, cond_b, null = labelled
    assert cond_a.shape == uncond.shape == x.shape
    assert max_diff(cond_a, cond_b) > 1e-4
    assert max_diff(cond_a, uncond) > 1e-4
    np.testing.assert_allclose(uncond, null, rtol=1e-4, atol=1e-5)  # y=None is the null class num_classes
    # The label enters as its row of the embedding table, added to the noise embedding (NumPy reference).
    if not isinstance(model, UNet):
        ref = _mlp_reference if isinstance(model, MLPResNet) else functools.partial(_dit_reference, patch=2, heads=2)
        for labels, got in zip(([0, 1, 2], [3, 3, 3]), (cond_a, cond_b), strict=True):
            assert rel_l2(got, ref(params, x, t, y=labels)) < 1e-5


def test_unconditional_model_rejects_labels():
    model = MLPResNet(**TINY_MLP)
    with pytest.raises(ValueError, match="num_classes=None"):
        model.init(jax.random.key(0), np.ones((2, 2), np.float32), 0.5, np.zeros(2, np.int32))


@pytest.mark.parametrize("embedding", ["positional", "fourier"])
def test_noise_embeddings_condition_on_t(embedding):
    model = MLPResNet(**TINY_MLP, embedding=embedding)
    x = np.ones((2, 2), np.float32)
    out = forward(model)(random_params(model, 0, x, 0.5), x, jnp.array([0.1, 2.0]))
    assert max_diff(out[0], out[1]) > 1e-4


# ----------------------------------------------------------------------------- initialization


@pytest.fixture(scope="module")
def unet_init():
    """The tiny U-Net's jitted ``init``, shared by the tests that need its real initialization."""
    return fast_jit(UNet(**TINY_UNET).init)


@pytest.fixture(scope="module")
def dit_init():
    return fast_jit(DiT(**OVERFIT_DIT).init)


def test_unet_deterministic_and_zero_output_at_init(unet_init):
    x, t = normal((8, 8, 8, 1)), np.linspace(0.1, 0.9, 8, dtype=np.float32)
    a, b, c = unet_init(jax.random.key(0), x, t), unet_init(jax.random.key(0), x, t), unet_init(jax.random.key(3), x, t)
    assert all(bool(np.array_equal(u, v)) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
    assert not all(bool(np.array_equal(u, v)) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(c), strict=True))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(a))
    model = UNet(**TINY_UNET)
    apply = forward(model)
    np.testing.assert_array_equal(apply(a["params"], x, t), 0.0)  # ADM zero-initialized output layer
    perturbed = random_params(model, 5, x, t)
    np.testing.assert_array_equal(apply(perturbed, x, t), apply(perturbed, x, t))


def test_dit_block_identity_and_zero_output_at_init(dit_init):
    x = normal((2, 5, 32))
    c = normal((2, 32), seed=2)
    block = DiTBlock(32, 4)
    out = fast_jit(lambda key: block.apply(block.init(key, x, c), x, c))(jax.random.key(2))
    np.testing.assert_array_equal(out, x)

    images, t = normal((8, 8, 8, 1)), np.linspace(0.1, 0.9, 8, dtype=np.float32)
    variables = dit_init(jax.random.key(4), images, t)
    np.testing.assert_array_equal(forward(DiT(**OVERFIT_DIT))(variables["params"], images, t), 0.0)


def test_dropout_only_in_training():
    model = UNet(**FLAT_UNET, dropout=0.5)
    x, t = normal((2, 8, 8, 1)), jnp.array([0.3, 0.7])
    params = {"params": random_params(model, 0, x, t)}
    apply = fast_jit(functools.partial(model.apply, params, x, t), static_argnames="train")
    train_a = apply(train=True, rngs={"dropout": jax.random.key(1)})
    train_a2 = apply(train=True, rngs={"dropout": jax.random.key(1)})
    train_b = apply(train=True, rngs={"dropout": jax.random.key(2)})
    eval_a = apply(train=False, rngs={"dropout": jax.random.key(1)})
    eval_b = apply(train=False, rngs={"dropout": jax.random.key(2)})
    np.testing.assert_array_equal(train_a, train_a2)
    assert max_diff(train_a, train_b) > 1e-3
    np.testing.assert_array_equal(eval_a, eval_b)


def test_mlp_dropout_only_in_training():
    model = MLPResNet(**TINY_MLP, dropout=0.5)
    x = np.ones((4, 2), np.float32)
    params = {"params": random_params(model, 0, x, 0.5)}
    apply = fast_jit(functools.partial(model.apply, params, x, 0.5), static_argnames="train")
    run = lambda seed, train: apply(train=train, rngs={"dropout": jax.random.key(seed)})
    assert max_diff(run(1, True), run(2, True)) > 1e-3
    np.testing.assert_array_equal(run(1, False), run(2, False))
    np.testing.assert_array_equal(run(1, False), apply(train=False))  # no rng needed at eval


# ----------------------------------------------------------------------------- precision, remat, self-conditioning

# Relative L2 error allowed for the bfloat16 forward pass against float32 (measured: U-Net 1.4%, DiT 0.3%, MLP 0.6%).
BF16_TOLERANCE = 0.04


@pytest.mark.parametrize(
    ("cls", "kwargs", "shape"),
    [(UNet, FLAT_UNET, (2, 8, 8, 3)), (DiT, TINY_DIT, (2, 8, 8, 3)), (MLPResNet, TINY_MLP, (4, 3))],
    ids=["unet", "dit", "mlp"],
)
def test_bfloat16_matches_float32(cls, kwargs, shape):
    x = normal(shape)
    t = np.linspace(0.2, 0.8, shape[0], dtype=np.float32)
    params = random_params(cls(**kwargs), 2, x, t)
    both = lambda p: [cls(**kwargs, dtype=d).apply({"params": p}, x, t) for d in (jnp.float32, jnp.bfloat16)]
    ref, low = fast_jit(both)(params)
    assert low.dtype == jnp.float32 and np.linalg.norm(ref) > 0.1  # output layers not zero
    assert 0 < rel_l2(low, ref) < BF16_TOLERANCE


def test_bfloat16_keeps_float32_params():
    model = DiT(**TINY_DIT, dtype=jnp.bfloat16)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), np.ones((1, 8, 8, 1), np.float32), 0.5))
    assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}


def test_remat_same_params_outputs_and_grads():
    """Rematerialization changes neither the parameter tree nor the gradients (checked numerically on the MLP)."""
    x, t = normal((4, 3)), np.linspace(0.2, 0.8, 4, dtype=np.float32)
    plain = MLPResNet(**TINY_MLP)
    remats = [MLPResNet(**TINY_MLP, remat=policy) for policy in (True, "dots", "dots_all")]
    params = random_params(plain, 0, x, t)
    grads = fast_jit(
        lambda p: [jax.grad(lambda q: jnp.sum(m.apply({"params": q}, x, t) ** 2))(p) for m in (plain, *remats)]
    )(params)
    for remat in grads[1:]:
        assert jax.tree.structure(grads[0]) == jax.tree.structure(remat)
        for a, b in zip(*map(jax.tree.leaves, (grads[0], remat)), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="remat must be True, False or one of 'full', 'dots', 'dots_all'; got 'some'"):
        MLPResNet(**TINY_MLP, remat="some").init(jax.random.key(0), x, t)

    images = normal((2, 8, 8, 1))
    for plain, remat in [
        (UNet(**TINY_UNET), UNet(**TINY_UNET, remat=True)),
        (DiT(**TINY_DIT), DiT(**TINY_DIT, remat=True)),
    ]:
        params = random_params(plain, 0, images, 0.5)
        assert jax.tree.structure(params) == jax.tree.structure(random_params(remat, 0, images, 0.5))
        grad = jax.eval_shape(lambda p: jax.grad(lambda q: jnp.sum(remat.apply({"params": q}, images, 0.5)))(p), params)
        assert jax.tree.structure(grad) == jax.tree.structure(params)


@pytest.mark.parametrize(
    ("model", "shape"),
    [
        (UNet(**FLAT_UNET, self_condition=True), (2, 8, 8, 1)),
        (DiT(**TINY_DIT, self_condition=True), (2, 8, 8, 1)),
        (MLPResNet(**TINY_MLP, self_condition=True), (2, 2)),
    ],
    ids=["unet", "dit", "mlp"],
)
def test_self_conditioning(model, shape):
    x = normal(shape)
    params = random_params(model, 0, x, 0.5)
    apply = fast_jit(lambda p, s: model.apply({"params": p}, x, 0.5, self_cond=s))
    first = forward(model)(params, x, 0.5)
    np.testing.assert_array_equal(first, apply(params, np.zeros(shape, np.float32)))
    second = apply(params, first + 1.0)
    assert second.shape == shape and max_diff(second, first) > 1e-4
    with pytest.raises(ValueError, match="self_cond must have the shape"):
        apply(params, np.zeros((1, *shape[1:]), np.float32))


def test_self_cond_without_self_condition_raises():
    with pytest.raises(ValueError, match="self_condition=False"):
        MLPResNet(**TINY_MLP).init(
            jax.random.key(0), np.ones((2, 2), np.float32), 0.5, self_cond=np.ones((2, 2), np.float32)
        )


# ----------------------------------------------------------------------------- parameter counts

PAPER_PARAMS = {"S/2": 33e6, "B/2": 130e6, "L/2": 458e6, "XL/2": 675e6}  # Peebles & Xie 2023, table 1


@pytest.mark.parametrize("name", list(PAPER_PARAMS))
def test_dit_parameter_count_matches_paper(name):
    model = dit(name, num_classes=1000, learn_sigma=True)
    x = jax.ShapeDtypeStruct((1, 32, 32, 4), jnp.float32)  # 256x256 images as 32x32x4 latents
    shapes = jax.eval_shape(model.init, jax.random.key(0), x, jnp.zeros(1), jnp.zeros(1, jnp.int32))
    count = sum(leaf.size for leaf in jax.tree.leaves(shapes["params"]))
    assert abs(count / PAPER_PARAMS[name] - 1) < 0.01, (name, count)


def test_dit_configs():
    assert dit_config("XL/2") == dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2)
    assert dit_config("DiT-S/8") == dict(depth=12, hidden_size=384, num_heads=6, patch_size=8)
    assert len(DIT_CONFIGS) == 12
    assert dit("B/4", depth=3).depth == 3


# ----------------------------------------------------------------------------- network -> denoiser


def test_edm_denoiser_matches_hand_computation():
    net = MLPResNet(**TINY_MLP)
    sigma_data = 0.5
    x = 3.0 * normal((4, 2))
    sigma = jnp.array([0.01, 0.5, 2.0, 40.0])
    net_params = random_params(net, 0, x, sigma)

    def both(p):
        got = make_denoiser(net, p, difflax.EDM(sigma_data=sigma_data), "edm")(x, sigma)
        total = sigma**2 + sigma_data**2
        c_skip, c_out = sigma_data**2 / total, sigma * sigma_data / jnp.sqrt(total)
        c_in, c_noise = 1.0 / jnp.sqrt(total), jnp.log(sigma) / 4.0
        f = net.apply({"params": p}, c_in[:, None] * x, c_noise)
        return got, c_skip[:, None] * x + c_out[:, None] * f

    got, want = fast_jit(both)(net_params)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert max_diff(got, x) > 1e-3  # F contributes


def test_edm_denoiser_scales_by_alpha_for_vp():
    net = MLPResNet(**TINY_MLP)
    process = difflax.VP()
    x, t = normal((3, 2)), jnp.array([0.1, 0.5, 0.9])
    net_params = random_params(net, 0, x, t)

    def both(p):
        got = make_denoiser(net, p, process, "edm", sigma_data=1.0)(x, t)
        alpha, sigma = process.alpha(t)[:, None], process.sigma(t)[:, None]
        s = sigma / alpha  # noise level of x / alpha
        f = net.apply({"params": p}, x / alpha / jnp.sqrt(s**2 + 1.0), jnp.log(s[:, 0]) / 4.0)
        return got, x / alpha / (s**2 + 1.0) + s / jnp.sqrt(s**2 + 1.0) * f

    got, want = fast_jit(both)(net_params)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction", ["eps", "v", "velocity", "x0"])
def test_denoiser_predictions_use_as_denoiser(prediction):
    net = MLPResNet(**TINY_MLP)
    process = difflax.Flow() if prediction == "velocity" else difflax.VP()
    x, t = normal((3, 2)), jnp.array([0.1, 0.5, 0.9])
    net_params = random_params(net, 0, x, t)

    def both(p):
        got = make_denoiser(net, p, process, prediction, noise_scale=1000.0)(x, t)
        apply_fn = lambda x_t, tt: net.apply({"params": p}, x_t, 1000.0 * tt)
        return got, difflax.as_denoiser(apply_fn, process, prediction)(x, t)

    got, want = fast_jit(both)(net_params)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("model", "shape"),
    [(UNet(), (2, 32, 32, 3)), (DiT(), (2, 32, 32, 4)), (dit("S/2"), (2, 32, 32, 4)), (MLPResNet(), (2, 5))],
    ids=["UNet", "DiT", "dit-S/2", "MLPResNet"],
)
def test_default_models_work_with_as_denoiser(model, shape):
    """Every model with its default settings predicts a quantity of the shape of ``x``, so
    :func:`difflax.as_denoiser` takes it as it is (shapes only: nothing is compiled)."""
    x, t = jax.ShapeDtypeStruct(shape, jnp.float32), jax.ShapeDtypeStruct(shape[:1], jnp.float32)

    def denoise(x, t):
        params = model.init(jax.random.key(0), x, t)
        return difflax.as_denoiser(lambda x_t, tt: model.apply(params, x_t, tt), difflax.VP())(x, t)

    out = jax.eval_shape(denoise, x, t)
    assert out.shape == shape and out.dtype == jnp.float32


def test_denoiser_of_learned_sigma_dit_and_labels():
    net = DiT(**{**TINY_DIT, "learn_sigma": True, "num_classes": 3})
    process = difflax.DiscreteVP.cosine()
    x, t, y = normal((2, 8, 8, 1)), jnp.array([0.3, 0.6]), jnp.array([0, 2])
    net_params = random_params(net, 0, x, t, y)

    def both(p):
        got = make_denoiser(net, p, process, "eps", y)(x, t)
        eps = net.apply({"params": p}, x, t, y)[..., :1]  # first half: eps, second: variance
        alpha, sigma = process.alpha(t)[:, None, None, None], process.sigma(t)[:, None, None, None]
        return got, (x - sigma * eps) / alpha

    got, want = fast_jit(both)(net_params)
    assert got.shape == x.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_denoiser_unknown_prediction():
    with pytest.raises(ValueError, match="prediction"):
        make_denoiser(MLPResNet(), {}, difflax.VP(), prediction="noise")


# ----------------------------------------------------------------------------- overfitting


@pytest.mark.parametrize(("model", "init"), [(UNet(**TINY_UNET), "unet_init"), (DiT(**OVERFIT_DIT), "dit_init")])
def test_overfit_batch(model, init, digits, request):
    """200 Adam steps of the eps-prediction loss on 8 digits at fixed noise levels cut the loss 10x."""
    process = difflax.VP()
    t = np.linspace(0.05, 0.95, digits.shape[0], dtype=np.float32)
    eps = normal(digits.shape, seed=7)
    x_t = process.marginal(digits, t, eps)
    params = request.getfixturevalue(init)(jax.random.key(0), x_t, t)["params"]
    tx = optax.adam(3e-3)

    def loss_fn(p):
        return jnp.mean((model.apply({"params": p}, x_t, 1000.0 * t) - eps) ** 2)

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = fast_jit(tx.init)(params)
    losses = []
    for _ in range(200):  # a Python loop of jitted steps runs ~5x faster on CPU than the same lax.scan
        params, opt_state, loss = step(params, opt_state)
        losses.append(loss)
    first, last = float(losses[0]), float(losses[-1])
    assert last < first / 10, (first, last)


# ----------------------------------------------------------------------------- bad configs


def test_unet_image_size_not_divisible():
    model = UNet(**{**TINY_UNET, "channel_mult": (1, 2, 2), "attention_resolutions": ()})
    with pytest.raises(ValueError, match=r"2\^\(len\(channel_mult\) - 1\) = 4"):
        model.init(jax.random.key(0), np.ones((1, 10, 8, 1), np.float32), 0.5)


def test_unet_unknown_attention_resolution():
    model = UNet(**{**TINY_UNET, "attention_resolutions": (3,)})
    with pytest.raises(ValueError, match=r"attention_resolutions \[3\].*\[8, 4\]"):
        model.init(jax.random.key(0), np.ones((1, 8, 8, 1), np.float32), 0.5)


def test_unet_norm_groups_must_divide_width():
    with pytest.raises(ValueError, match="norm_groups=32"):
        UNet(**{**TINY_UNET, "norm_groups": 32}).init(jax.random.key(0), np.ones((1, 8, 8, 1), np.float32), 0.5)


def test_dit_image_size_not_divisible_by_patch():
    with pytest.raises(ValueError, match="patch_size=4"):
        DiT(**{**TINY_DIT, "patch_size": 4}).init(jax.random.key(0), np.ones((1, 8, 10, 1), np.float32), 0.5)


def test_unknown_dit_config_lists_known():
    with pytest.raises(ValueError, match=r"'XXL/2'.*S/2, S/4, S/8, B/2.*XL/8"):
        dit_config("XXL/2")


def test_unknown_embedding():
    with pytest.raises(ValueError, match="'learned'"):
        MLPResNet(**TINY_MLP, embedding="learned").init(jax.random.key(0), np.ones((1, 2), np.float32), 0.5)


@pytest.mark.parametrize(
    "model, shape, bottleneck",
    [
        (UNet(**FLAT_UNET), (3, 8, 8, 1), "mid_block2"),
        (DiT(**TINY_DIT), (3, 8, 8, 1), "block0"),
        (MLPResNet(**TINY_MLP), (3, 2), "block1"),
    ],
)
def test_bottleneck_features_at_the_denoisers_input(model, shape, bottleneck):
    """``make_features`` returns the output of the bottleneck module (as Flax captures it) at the input the EDM
    denoiser gives the network, ``(c_in x_t, c_noise)``; sowing changes neither the output nor what a plain
    call returns."""
    from difflax.train.builders import make_features

    process = difflax.EDM()
    x_t, t = 3.0 * normal(shape), jnp.array([0.3, 2.0, 40.0])
    params = random_params(model, 0, x_t, t)
    features = make_features(model, params, process, "edm")(x_t, t)
    sigma = np.asarray(t)
    c_in = (1 / np.sqrt(sigma**2 + 0.25)).reshape((3,) + (1,) * (len(shape) - 1))
    c_noise = np.log(sigma) / 4
    out, captured = model.apply({"params": params}, c_in * x_t, c_noise, capture_intermediates=True)
    np.testing.assert_allclose(features, captured["intermediates"][bottleneck]["__call__"][0], rtol=1e-6, atol=1e-6)
    plain = model.apply({"params": params}, c_in * x_t, c_noise)  # an array: nothing sown without asking
    np.testing.assert_array_equal(plain, out)
    logits = FeatureCritic().init_with_output(jax.random.key(0), features)[0]
    assert logits.shape == (3,)

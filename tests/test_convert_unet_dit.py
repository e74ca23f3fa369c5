"""diffusers ``UNet2DModel`` / ``DiTTransformer2DModel`` checkpoints -> difflax and back (needs the bench extra).

Small randomly initialised diffusers models (every parameter perturbed, so no norm or bias
sits at its initial value) are saved with ``save_pretrained`` as safetensors and converted;
both sides then run on the same inputs in float32. The t <-> step mapping is exact at the
times used here: ``t = (n + 1) / N`` with ``N t`` a power-of-two fraction of 1000.
"""

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

import difflax  # noqa: E402
from difflax.hub import (  # noqa: E402
    ConversionError,
    convert_dit,
    convert_unet2d,
    dit_from_config,
    export_dit,
    export_unet2d,
    unet2d_from_config,
)
from difflax.hub.dit import _DEFAULTS as DIT_DEFAULTS  # noqa: E402
from difflax.hub.unet import _DEFAULTS as UNET_DEFAULTS  # noqa: E402

pytestmark = [
    pytest.mark.bench,
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
]

TOL = 1e-5
T = np.array([1.0, 0.5, 0.25, 0.125], np.float32)  # steps 999, 499, 249, 124
UNETS = {
    # DDPM (Ho et al. 2020): sin-cos order and frequency shift of the CIFAR-10 checkpoint, TF-style padding, 1 head.
    "ddpm_attention": dict(block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                           up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=8,
                           attention_head_dim=None, flip_sin_to_cos=False, freq_shift=1, downsample_padding=0,
                           norm_eps=1e-6),
    # No attention anywhere, ADM's scale-shift conditioning, three levels.
    "no_attention": dict(block_out_channels=(16, 16, 32), down_block_types=("DownBlock2D",) * 3,
                         up_block_types=("UpBlock2D",) * 3, layers_per_block=1, norm_num_groups=8,
                         add_attention=False, resnet_time_scale_shift="scale_shift"),
    # Class-conditional, 2 heads of 8, centred input, rescaled middle with its own attention groups.
    "class_conditional": dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=4,
                              down_block_types=("AttnDownBlock2D", "DownBlock2D"),
                              up_block_types=("UpBlock2D", "AttnUpBlock2D"), attention_head_dim=8,
                              num_class_embeds=5, center_input_sample=True, mid_block_scale_factor=math.sqrt(2.0),
                              attn_norm_num_groups=2),
}
DIT = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
           patch_size=2, num_embeds_ada_norm=10)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The models are tiny: more threads only contend for the cores (and the first calls get slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _perturb(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _rel(got, want):
    return float(np.linalg.norm(np.asarray(got) - want) / np.linalg.norm(want))


def _steps(info):
    return torch.from_numpy(np.array(info.process.timestep(T)))


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def _nhwc(x):
    return np.transpose(x.detach().numpy(), (0, 2, 3, 1))


@pytest.fixture(scope="module")
def unets(tmp_path_factory):
    out = {}
    for i, (name, kwargs) in enumerate(UNETS.items()):
        model = _perturb(diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, **kwargs), i)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path, safe_serialization=True)
        out[name] = model, str(path)
    return out


def _tie_embeddings(model):
    first = model.transformer_blocks[0].norm1.emb.state_dict()
    for block in model.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(first)
    return model


@pytest.fixture(scope="module")
def dits(tmp_path_factory):
    out = {}
    for tied in (False, True):
        model = _perturb(diffusers.DiTTransformer2DModel(**DIT), 10)
        model = _tie_embeddings(model) if tied else model
        path = tmp_path_factory.mktemp(f"dit_tied{tied}")
        model.save_pretrained(path, safe_serialization=True)
        out[tied] = model, str(path)
    return out


@pytest.mark.parametrize("name", list(UNETS))
def test_unet2d_matches_diffusers(unets, name):
    torch_model, path = unets[name]
    model, params, info = convert_unet2d(path)
    assert info.prediction == "eps" and info.scheduler_config is None  # the DDPM defaults
    np.testing.assert_allclose(model.time_scale * T + model.time_shift, info.process.timestep(T), rtol=0, atol=0)
    x = np.random.default_rng(0).normal(size=(len(T), 8, 8, 3)).astype(np.float32)
    y = np.array([0, 4, 2, 1]) if model.num_class_embeds else None
    with torch.no_grad():
        labels = None if y is None else torch.from_numpy(y)
        want = _nhwc(torch_model(_nchw(x), _steps(info), labels).sample)
    got = jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y))(params, x, T, y)
    assert _rel(got, want) <= TOL


@pytest.mark.parametrize("name", list(UNETS))
def test_unet2d_export_round_trip(unets, name):
    torch_model, path = unets[name]
    model, params, _ = convert_unet2d(path)
    exported = export_unet2d(model, params)
    state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    assert exported.keys() == state.keys()
    assert all(np.array_equal(exported[k], state[k]) for k in state)


@pytest.mark.parametrize("tied", [False, True])
def test_dit_matches_diffusers(dits, tied):
    torch_model, path = dits[tied]
    model, params, info = convert_dit(path)
    assert model.tie_embeddings == tied
    apply = jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y))
    rng = np.random.default_rng(1)
    labels = np.array([0, 9, 10, 3])  # 10 = the null class
    # The trained size, and (untied only, to keep compilations few) one whose position grid is rescaled,
    # with y=None for the null class.
    for size, y in [(8, labels)] + ([] if tied else [(12, None)]):
        x = rng.normal(size=(len(T), size, size, 4)).astype(np.float32)
        with torch.no_grad():
            null = torch.full((len(T),), 10)
            want = torch_model(_nchw(x), _steps(info), null if y is None else torch.from_numpy(y)).sample
        got = apply(params, x, T, y)
        assert got.shape == (len(T), size, size, 8)  # learned sigma: 2 C channels
        assert _rel(got, _nhwc(want)) <= TOL, size


@pytest.mark.parametrize("tied", [False, True])
def test_dit_export_round_trip(dits, tied):
    torch_model, path = dits[tied]
    model, params, _ = convert_dit(path)
    exported = export_dit(model, params)
    state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    assert exported.keys() == state.keys()
    assert all(np.array_equal(exported[k], state[k]) for k in state)


def _count(tree):
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def _meta_count(cls, **config):
    with torch.device("meta"):
        return sum(p.numel() for p in cls(**config).parameters())


def _shapes(model, size, channels, y):
    x = jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), x, t, y)["params"]


def test_full_size_parameter_counts():
    # DiT-XL/2 at 256px: 674,834,720 trainable (Peebles & Xie report 675,129,632 with the fixed 16x16 position
    # table); diffusers' layout repeats the timestep + label embedding in all 28 blocks.
    y = jax.ShapeDtypeStruct((1,), jnp.int32)
    tied = _count(_shapes(dit_from_config(dict(DIT_DEFAULTS, out_channels=8), tie_embeddings=True), 32, 4, y))
    assert tied == 674_834_720
    untied = _count(_shapes(dit_from_config(dict(DIT_DEFAULTS, out_channels=8)), 32, 4, y))
    assert untied == _meta_count(diffusers.DiTTransformer2DModel, out_channels=8)
    # DDPM CIFAR-10 (Ho et al. 2020): 35.7M.
    ddpm = dict(block_out_channels=(128, 256, 256, 256), attention_head_dim=None, flip_sin_to_cos=False, freq_shift=1,
                down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"), norm_eps=1e-6,
                up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), downsample_padding=0)
    count = _count(_shapes(unet2d_from_config(dict(UNET_DEFAULTS, **ddpm)), 32, 3, None))
    assert count == _meta_count(diffusers.UNet2DModel, sample_size=32, **ddpm)
    assert round(count / 1e6, 1) == 35.7


def test_ddim_sampling_matches_diffusers(unets):
    torch_model, path = unets["ddpm_attention"]
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False,
                                        set_alpha_to_one=True, timestep_spacing="trailing")
    model, params, info = convert_unet2d(path, scheduler=scheduler.config)
    steps = 10
    scheduler.set_timesteps(steps)
    x_T = np.random.default_rng(2).normal(size=(2, 8, 8, 3)).astype(np.float32)
    x = _nchw(x_T)
    with torch.no_grad():
        for n in scheduler.timesteps:
            x = scheduler.step(torch_model(x, n).sample, n, x).prev_sample
    want = _nhwc(x)
    # diffusers' trailing timesteps 999, 899, ..., 99 are t = 1, 0.9, ..., 0.1: difflax's "trailing" grid.
    np.testing.assert_allclose(difflax.make_grid("trailing", info.process, steps)[:-1],
                               (scheduler.timesteps.numpy() + 1) / 1000, rtol=1e-6)
    denoise = difflax.as_denoiser(lambda x, t: model.apply({"params": params}, x, t), info.process, info.prediction)
    got, stats = jax.jit(lambda x: difflax.sample(denoise, info.process, x, solver="ddim", steps=steps,
                                                  grid="trailing"))(jnp.asarray(x_T))
    assert int(stats["nfe"]) == steps
    assert _rel(got, want) <= 1e-4


def _write(path, config, tensors):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    safetensors_numpy.save_file(tensors, str(path / "diffusion_pytorch_model.safetensors"))


def _load(path):
    return json.loads((path / "config.json").read_text()), safetensors_numpy.load_file(
        str(path / "diffusion_pytorch_model.safetensors"))


def test_bad_checkpoints(unets, dits, tmp_path):
    unet_path, dit_path = Path(unets["ddpm_attention"][1]), Path(dits[False][1])
    with pytest.raises(ConversionError, match=r"'_class_name'.*DiTTransformer2DModel"):
        convert_unet2d(str(dit_path))
    with pytest.raises(ConversionError, match=r"'_class_name'.*UNet2DModel"):
        convert_dit(str(unet_path))
    config, tensors = _load(unet_path)
    name = "down_blocks.1.attentions.0.to_k.weight"
    cases = {
        "missing": (config, {k: v for k, v in tensors.items() if k != name}, f"tensor '{name}' is missing"),
        "shape": (config, {**tensors, name: tensors[name][:, :-1]}, rf"tensor '{name}' .* has shape"),
        "extra": (config, {**tensors, "extra.weight": tensors[name]}, "extra.weight"),
        "unknown key": ({**config, "cross_attention_dim": 8}, tensors, "'cross_attention_dim'"),
        "other tensors": ({k: v for k, v in config.items() if k != "_class_name"}, _load(dit_path)[1], "is missing"),
        "unsupported": ({**config, "time_embedding_type": "fourier"}, tensors, "'time_embedding_type'"),
        "block type": ({**config, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"]}, tensors,
                       r"'down_block_types'.*CrossAttnDownBlock2D"),
    }
    for case, (cfg, tens, message) in cases.items():
        _write(tmp_path / case, cfg, tens)
        with pytest.raises(ConversionError, match=message):
            convert_unet2d(str(tmp_path / case))
    dit_config = {k: v for k, v in _load(dit_path)[0].items() if k != "_class_name"}
    _write(tmp_path / "dit_as_unet", dit_config, _load(dit_path)[1])
    with pytest.raises(ConversionError, match=r"unknown to the UNet2DModel layout.*num_attention_heads"):
        convert_unet2d(str(tmp_path / "dit_as_unet"))
    with pytest.raises(ConversionError, match="'beta_schedule' is 'sigmoid'"):
        convert_unet2d(str(unet_path), scheduler={"beta_schedule": "sigmoid"})
    with pytest.raises(ConversionError, match="parameter conv_in/kernel"):
        export_unet2d(convert_unet2d(str(unet_path))[0], convert_dit(str(dit_path))[1])


def test_pipeline_folder_scheduler_and_old_attention_names(unets, tmp_path):
    config, tensors = _load(Path(unets["ddpm_attention"][1]))
    old = {k.replace(".to_q.", ".query.").replace(".to_out.0.", ".proj_attn."): v for k, v in tensors.items()}
    _write(tmp_path / "unet", config, old)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=500, beta_schedule="scaled_linear",
                                        prediction_type="v_prediction")
    scheduler.save_pretrained(tmp_path / "scheduler")
    model, params, info = convert_unet2d(str(tmp_path))
    assert info.prediction == "v" and info.process.num_steps == 500 and model.time_scale == 500.0
    np.testing.assert_allclose(info.process.alphas_cumprod, scheduler.alphas_cumprod.numpy(), rtol=2e-5)
    reference = convert_unet2d(unets["ddpm_attention"][1])[1]
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, params, reference)))
    for kind, want in (("epsilon", "eps"), ("sample", "x0")):
        assert convert_unet2d(str(tmp_path), scheduler={"prediction_type": kind})[2].prediction == want
    cosine = convert_unet2d(str(tmp_path), scheduler={"beta_schedule": "squaredcos_cap_v2"})[2].process
    reference = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod.numpy()
    np.testing.assert_allclose(cosine.alphas_cumprod, reference, rtol=1e-4)


def test_dit_saved_as_transformer2d(dits, tmp_path):
    """DiT checkpoints published before ``DiTTransformer2DModel`` existed name the older class."""
    config, tensors = _load(Path(dits[True][1]))
    _write(tmp_path, {**config, "_class_name": "Transformer2DModel", "cross_attention_dim": None}, tensors)
    model, params, _ = convert_dit(str(tmp_path))
    reference = convert_dit(dits[True][1])[1]
    assert model.tie_embeddings and all(jax.tree.leaves(jax.tree.map(np.array_equal, params, reference)))
    _write(tmp_path / "other", {**config, "_class_name": "Transformer2DModel", "norm_type": "layer_norm"}, tensors)
    with pytest.raises(ConversionError, match="'norm_type' is 'layer_norm'"):
        convert_dit(str(tmp_path / "other"))

"""difflax.metrics: exact distances, streaming statistics, feature networks and the evaluation loop."""

import itertools
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.special
import scipy.stats
from flax.traverse_util import flatten_dict

import difflax
from difflax.analytic import GaussianMixture
from difflax.metrics import digits as digits_lib
from difflax.metrics import evaluate as evaluate_lib
from difflax.metrics import inception as inception_lib
from difflax.metrics import stats as stats_lib
from difflax.metrics.frechet import frechet_distance
from difflax.metrics.kid import kid
from difflax.metrics.prdc import prdc
from difflax.metrics.sample_based import energy_distance, exact_nll, mmd, sliced_wasserstein


# ============================================================================ Fréchet distance
def scipy_frechet(mu1, s1, mu2, s2, eps=1e-6):
    """The usual FID code (TTUR / pytorch-fid): ``sqrtm`` of the non-symmetric product."""
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = np.real(covmean)
    return diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


def _spd(rng, d, eigvals):
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return (q * eigvals) @ q.T


def test_frechet_identical_statistics_is_zero():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 32))
    mu, sigma = a.mean(0), np.cov(a, rowvar=False)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)
    ill = _spd(rng, 24, np.logspace(-14, 2, 24))
    assert frechet_distance(mu[:24], ill, mu[:24], ill) == pytest.approx(0.0, abs=1e-8)


def test_frechet_closed_form_for_commuting_diagonal_covariances():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=10), rng.normal(size=10)
    a, b = rng.uniform(0.1, 3.0, 10), rng.uniform(0.0, 2.0, 10)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    # same eigenvectors, rotated: still commuting
    q, _ = np.linalg.qr(rng.normal(size=(10, 10)))
    got = frechet_distance(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize(
    "case", ["random_spd", "sample_cov", "rank_deficient", "tiny_eigenvalues", "rank_deficient_both"]
)
def test_frechet_matches_scipy_sqrtm(case):
    rng = np.random.default_rng(hash(case) % 2**32)
    d = 48
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d) * 0.5
    if case == "random_spd":
        s1, s2 = _spd(rng, d, rng.uniform(0.1, 5, d)), _spd(rng, d, rng.uniform(0.1, 5, d))
    elif case == "sample_cov":
        a = rng.normal(size=(1000, d))
        b = rng.normal(size=(1000, d)) * 1.3 + 0.3 * a[:, ::-1]
        s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    elif case == "rank_deficient":  # fewer samples than dimensions, as FID with 2048-d features
        s1 = np.cov(rng.normal(size=(30, d)), rowvar=False)
        s2 = _spd(rng, d, rng.uniform(0.5, 2, d))
    elif case == "rank_deficient_both":
        s1 = np.cov(rng.normal(size=(20, d)), rowvar=False)
        s2 = np.cov(rng.normal(size=(35, d)) * 2, rowvar=False)
    else:
        s1 = _spd(rng, d, np.logspace(-14, 2, d))
        s2 = _spd(rng, d, np.logspace(-12, 1, d))
    ours = frechet_distance(mu1, s1, mu2, s2)
    ref = scipy_frechet(mu1, s1, mu2, s2)
    assert ours == pytest.approx(ref, rel=1e-6)


def test_frechet_rejects_bad_shapes():
    with pytest.raises(ValueError, match="sigma1"):
        frechet_distance(np.zeros(3), np.zeros((3, 2)), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="mu1 and mu2"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ============================================================================ streaming statistics
def test_streaming_stats_over_uneven_batches_equal_one_shot():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(1000, 7)) * np.arange(1, 8) + 100.0  # large mean, small spread
    ref_cov = np.cov(x, rowvar=False)
    sizes = [1, 13, 200, 7, 379, 400]
    bounds = np.cumsum([0, *sizes])
    # float64 numpy batches on the host: exact to round-off
    host = stats_lib.init(7)
    for a, b in itertools.pairwise(bounds):
        host = stats_lib.update(host, x[a:b])
    assert float(host.count) == 1000
    np.testing.assert_allclose(host.mean, x.mean(0), rtol=1e-13)
    np.testing.assert_allclose(host.covariance(), ref_cov, rtol=1e-11)
    # float32 jax batches reduced on device, merged on the host in float64
    dev = stats_lib.init(7)
    for a, b in itertools.pairwise(bounds):
        dev = stats_lib.update(dev, jnp.asarray(x[a:b], jnp.float32))
    np.testing.assert_allclose(dev.mean, x.mean(0), rtol=1e-6)
    np.testing.assert_allclose(dev.covariance(), ref_cov, rtol=2e-4, atol=1e-4)
    # masked rows are not counted; merge jits on jax arrays; empty stats are the identity
    masked = jax.jit(stats_lib.batch_stats)(jnp.asarray(x[:10]), jnp.arange(10) < 6)
    assert float(masked.count) == 6
    np.testing.assert_allclose(masked.mean, x[:6].mean(0), rtol=1e-6)
    merged = jax.jit(stats_lib.merge)(masked, stats_lib.batch_stats(x[6:10]))
    np.testing.assert_allclose(merged.covariance(), np.cov(x[:10], rowvar=False), rtol=1e-4)
    both = stats_lib.merge(stats_lib.init(7), stats_lib.init(7))
    assert float(both.count) == 0 and np.all(both.mean == 0)


def test_stats_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    s = stats_lib.to_host(stats_lib.batch_stats(rng.normal(size=(50, 4))))
    stats_lib.save_stats(tmp_path / "s.npz", s)
    back = stats_lib.load_stats(tmp_path / "s.npz")
    for a, b in zip(s.mu_sigma(), back.mu_sigma(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    assert float(back.count) == 50
    np.savez(tmp_path / "ref.npz", mu=np.zeros(4), sigma=np.eye(4))  # pytorch-fid layout, no count
    np.testing.assert_array_equal(stats_lib.load_stats(tmp_path / "ref.npz").covariance(), np.eye(4))


_EIGHT_DEVICES = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec as P
    import difflax
    from difflax.analytic import GaussianMixture
    from difflax.metrics import evaluate as ev, stats as st
    from difflax.metrics.frechet import frechet_distance

    assert jax.device_count() == 8, jax.devices()
    out = {}
    # psum over the mesh axis, and device_get of per-device partials, versus one shot
    x = np.random.default_rng(0).normal(size=(64, 5)) * 3 + 10
    mesh8 = ev.make_data_mesh()
    psum = jax.shard_map(lambda f: st.psum_stats(st.batch_stats(f), "data"), mesh=mesh8,
                         in_specs=P("data"), out_specs=P())(jnp.asarray(x, jnp.float32))
    parts = jax.shard_map(lambda f: jax.tree.map(lambda a: a[None], st.batch_stats(f)), mesh=mesh8,
                          in_specs=P("data"), out_specs=P("data"))(jnp.asarray(x, jnp.float32))
    stacked = st.merge_stacked(st.to_host(parts))
    ref_cov = np.cov(x, rowvar=False)
    out["psum_err"] = float(np.max(np.abs(np.asarray(psum.covariance()) - ref_cov)))
    out["stacked_err"] = float(np.max(np.abs(stacked.covariance() - ref_cov)))
    # the evaluation loop on 1 device and on 8 devices
    gm = GaussianMixture.isotropic(jnp.array([[-2.0, 0.0], [2.0, 1.0]]), 0.5)
    p = difflax.EDM()
    ref = st.stats_from_moments(np.asarray(gm.mean()), np.asarray(gm.covariance()), 1e9)
    for name, mesh in [("one", ev.make_data_mesh(jax.devices()[:1])), ("eight", mesh8)]:
        r = ev.evaluate(gm.denoiser(p), p, (2,), feature_fn=lambda s: s, reference_stats=ref, seeds=(0, 1),
                        num_samples=300, batch_size=64, solver="heun", steps=8, mesh=mesh)
        out[name] = {"fd": r.metrics["fd"]["per_seed"], "count": [float(s.count) for s in r.stats],
                     "mean": [s.mean.tolist() for s in r.stats], "cov": [s.covariance().tolist() for s in r.stats]}
    print("RESULT" + json.dumps(out))
    """
)


def test_evaluation_on_one_and_eight_cpu_devices_agree():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _EIGHT_DEVICES], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert out["psum_err"] < 1e-3 and out["stacked_err"] < 1e-3
    one, eight = out["one"], out["eight"]
    assert one["count"] == eight["count"] == [300.0, 300.0]
    np.testing.assert_allclose(one["mean"], eight["mean"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(one["cov"], eight["cov"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(one["fd"], eight["fd"], rtol=1e-4, atol=1e-6)
    assert one["fd"][0] != one["fd"][1]  # different seeds, different samples


# ============================================================================ evaluation loop
def test_evaluate_loop_toy_mixture(tmp_path):
    """Exact denoiser of a labelled 2-D mixture: small FD, right classes, NLL near the entropy."""
    means = jnp.array([[-3.0, 0.0], [3.0, 0.0], [0.0, 3.0]])
    gm = GaussianMixture.isotropic(means, 0.4, labels=[0, 1, 2])
    process = difflax.EDM()
    ref = stats_lib.stats_from_moments(np.asarray(gm.mean()), np.asarray(gm.covariance()), 1e9)
    real = np.asarray(gm.sample(jax.random.key(7), 600)[0])
    entropy = -float(jnp.mean(jax.jit(gm.log_prob)(gm.sample(jax.random.key(8), 20000)[0])))
    classify = lambda x: jnp.log(gm.class_posterior(x, 1.0, 0.0) + 1e-30)
    result = evaluate_lib.evaluate(
        gm.conditional_denoiser(process),
        process,
        (2,),
        feature_fn=lambda s: s,
        reference_stats=ref,
        reference_features=real,
        seeds=(0, 1),
        num_samples=450,  # not a multiple of the batch: the last batch is masked
        batch_size=128,
        solver="heun",
        steps=18,
        num_classes=3,
        classifier_fn=classify,
        kid={"n_subsets": 10, "subset_size": 200},
        prdc={"k": 5},
        feature_metrics={"nll": lambda f: exact_nll(f, gm)},
        save_dir=tmp_path,
    )
    m = result.metrics
    assert [float(s.count) for s in result.stats] == [450.0] * 2
    assert set(m) >= {"fd", "accuracy", "kid", "precision", "recall", "density", "coverage", "nll"}
    assert len(m["fd"]["per_seed"]) == 2 and m["fd"]["std"] > 0 and m["fd"]["min"] <= m["fd"]["mean"]
    assert m["fd"]["mean"] < 0.1
    assert m["accuracy"]["mean"] > 0.97
    assert m["precision"]["mean"] > 0.85 and m["recall"]["mean"] > 0.85
    assert abs(m["nll"]["mean"] - entropy) < 0.15  # 18 Heun steps; shrinks with more
    assert abs(m["kid"]["mean"]) < m["kid_subset_std"]["mean"]
    saved = stats_lib.load_stats(tmp_path / "stats_seed1.npz")
    np.testing.assert_allclose(saved.covariance(), result.stats[1].covariance(), rtol=1e-12)
    with open(tmp_path / "results.json") as f:
        assert json.load(f)["metrics"]["fd"]["per_seed"] == m["fd"]["per_seed"]
    assert "fd:" in result.summary()


# ============================================================================ Inception
def test_inception_builds_with_fid_parameter_count():
    shapes = jax.eval_shape(
        inception_lib.InceptionV3FID(logits=True).init,
        jax.random.key(0),
        jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32),
    )
    counts = {k: int(np.prod(v.shape)) for k, v in flatten_dict(shapes["params"], sep="/").items()}
    total = sum(counts.values())
    fc = counts["fc/kernel"] + counts["fc/bias"]
    assert fc == 2048 * 1008 + 1008
    assert total - fc == 21_785_568  # torchvision Inception-v3 without aux head and classifier
    assert total == 23_850_960
    assert len(flatten_dict(shapes["batch_stats"])) == 2 * 94  # 94 conv+BN units
    out = jax.eval_shape(
        inception_lib.InceptionV3FID(logits=True).apply, shapes, jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    )
    assert out[0].shape == (2, 2048) and out[1].shape == (2, 1008)


def _random_inception_variables(seed, logits=False):
    """Random variables in the module's layout (numpy float32; He-scaled convs, non-trivial BN)."""
    shapes = inception_lib._expected_shapes(logits)
    rng = np.random.default_rng(seed)
    flat = {}
    for k, s in shapes.items():
        if k.endswith("kernel"):
            flat[k] = rng.standard_normal(s, np.float32) * np.float32(np.sqrt(2.0 / np.prod(s[:-1])))
        elif k.endswith("/scale") or k.endswith("/var"):
            flat[k] = rng.uniform(0.5, 1.5, size=s).astype(np.float32)
        else:
            flat[k] = rng.standard_normal(s, np.float32) * np.float32(0.1)
    return flat


def _to_torch_layout(flat):
    """Inverse of convert_torch_state_dict: the state dict pytorch-fid would hold."""
    out = {}
    bn = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
    for k, v in flat.items():
        _, *path, leaf = k.split("/")
        name = ".".join(path)
        if path[-1] == "conv":
            out[f"{name}.weight"] = v.transpose(3, 2, 0, 1)
        elif path[-1] == "bn":
            out[f"{name}.{bn[leaf]}"] = v
        elif path == ["fc"]:
            out["fc.weight" if leaf == "kernel" else "fc.bias"] = v.T if leaf == "kernel" else v
    for k in [k for k in out if k.endswith("running_var")]:
        out[k.replace("running_var", "num_batches_tracked")] = np.zeros((), np.int64)
    return out


def test_inception_npz_round_trip_with_converter_layout(tmp_path):
    flat = _random_inception_variables(0, logits=True)
    state_dict = _to_torch_layout(flat)
    assert "Mixed_7c.branch3x3dbl_3b.conv.weight" in state_dict and state_dict["fc.weight"].shape == (1008, 2048)
    np.savez(tmp_path / "w.npz", **inception_lib.convert_torch_state_dict(state_dict))
    for logits in (False, True):
        loaded = flatten_dict(inception_lib.load_inception(tmp_path / "w.npz", logits=logits), sep="/")
        assert set(loaded) == {k for k in flat if logits or not k.startswith("params/fc")}
        for k, v in loaded.items():
            np.testing.assert_array_equal(np.asarray(v), flat[k])
    bad = dict(flat)
    bad.pop("params/Mixed_5b/branch_pool/conv/kernel")
    np.savez(tmp_path / "bad.npz", **bad)
    with pytest.raises(ValueError, match="missing"):
        inception_lib.load_inception(tmp_path / "bad.npz")


def _torch_fid_inception():
    """pytorch-fid's FID Inception-v3 (torchvision blocks with its patches), in plain torch."""
    torch = pytest.importorskip("torch")
    nn, F = torch.nn, torch.nn.functional

    class Basic(nn.Module):
        def __init__(self, cin, cout, **kw):
            super().__init__()
            self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
            self.bn = nn.BatchNorm2d(cout, eps=0.001)

        def forward(self, x):
            return F.relu(self.bn(self.conv(x)))

    avg = lambda x: F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)

    class A(nn.Module):
        def __init__(self, cin, pool):
            super().__init__()
            self.branch1x1 = Basic(cin, 64, kernel_size=1)
            self.branch5x5_1 = Basic(cin, 48, kernel_size=1)
            self.branch5x5_2 = Basic(48, 64, kernel_size=5, padding=2)
            self.branch3x3dbl_1 = Basic(cin, 64, kernel_size=1)
            self.branch3x3dbl_2 = Basic(64, 96, kernel_size=3, padding=1)
            self.branch3x3dbl_3 = Basic(96, 96, kernel_size=3, padding=1)
            self.branch_pool = Basic(cin, pool, kernel_size=1)

        def forward(self, x):
            b5 = self.branch5x5_2(self.branch5x5_1(x))
            b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(avg(x))], 1)

    class B(nn.Module):
        def __init__(self, cin):
            super().__init__()
            self.branch3x3 = Basic(cin, 384, kernel_size=3, stride=2)
            self.branch3x3dbl_1 = Basic(cin, 64, kernel_size=1)
            self.branch3x3dbl_2 = Basic(64, 96, kernel_size=3, padding=1)
            self.branch3x3dbl_3 = Basic(96, 96, kernel_size=3, stride=2)

        def forward(self, x):
            bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return torch.cat([self.branch3x3(x), bd, F.max_pool2d(x, 3, stride=2)], 1)

    class C(nn.Module):
        def __init__(self, cin, c7):
            super().__init__()
            self.branch1x1 = Basic(cin, 192, kernel_size=1)
            self.branch7x7_1 = Basic(cin, c7, kernel_size=1)
            self.branch7x7_2 = Basic(c7, c7, kernel_size=(1, 7), padding=(0, 3))
            self.branch7x7_3 = Basic(c7, 192, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7dbl_1 = Basic(cin, c7, kernel_size=1)
            self.branch7x7dbl_2 = Basic(c7, c7, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7dbl_3 = Basic(c7, c7, kernel_size=(1, 7), padding=(0, 3))
            self.branch7x7dbl_4 = Basic(c7, c7, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7dbl_5 = Basic(c7, 192, kernel_size=(1, 7), padding=(0, 3))
            self.branch_pool = Basic(cin, 192, kernel_size=1)

        def forward(self, x):
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            bd = self.branch7x7dbl_1(x)
            for m in [self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5]:
                bd = m(bd)
            return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(avg(x))], 1)

    class D(nn.Module):
        def __init__(self, cin):
            super().__init__()
            self.branch3x3_1 = Basic(cin, 192, kernel_size=1)
            self.branch3x3_2 = Basic(192, 320, kernel_size=3, stride=2)
            self.branch7x7x3_1 = Basic(cin, 192, kernel_size=1)
            self.branch7x7x3_2 = Basic(192, 192, kernel_size=(1, 7), padding=(0, 3))
            self.branch7x7x3_3 = Basic(192, 192, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7x3_4 = Basic(192, 192, kernel_size=3, stride=2)

        def forward(self, x):
            b3 = self.branch3x3_2(self.branch3x3_1(x))
            b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
            return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)

    class E(nn.Module):
        def __init__(self, cin, max_pool):
            super().__init__()
            self.max_pool = max_pool
            self.branch1x1 = Basic(cin, 320, kernel_size=1)
            self.branch3x3_1 = Basic(cin, 384, kernel_size=1)
            self.branch3x3_2a = Basic(384, 384, kernel_size=(1, 3), padding=(0, 1))
            self.branch3x3_2b = Basic(384, 384, kernel_size=(3, 1), padding=(1, 0))
            self.branch3x3dbl_1 = Basic(cin, 448, kernel_size=1)
            self.branch3x3dbl_2 = Basic(448, 384, kernel_size=3, padding=1)
            self.branch3x3dbl_3a = Basic(384, 384, kernel_size=(1, 3), padding=(0, 1))
            self.branch3x3dbl_3b = Basic(384, 384, kernel_size=(3, 1), padding=(1, 0))
            self.branch_pool = Basic(cin, 192, kernel_size=1)

        def forward(self, x):
            b3 = self.branch3x3_1(x)
            b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
            bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
            pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else avg(x)
            return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.Conv2d_1a_3x3 = Basic(3, 32, kernel_size=3, stride=2)
            self.Conv2d_2a_3x3 = Basic(32, 32, kernel_size=3)
            self.Conv2d_2b_3x3 = Basic(32, 64, kernel_size=3, padding=1)
            self.Conv2d_3b_1x1 = Basic(64, 80, kernel_size=1)
            self.Conv2d_4a_3x3 = Basic(80, 192, kernel_size=3)
            self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = A(192, 32), A(256, 64), A(288, 64)
            self.Mixed_6a = B(288)
            self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e = (
                C(768, 128),
                C(768, 160),
                C(768, 160),
                C(768, 192),
            )
            self.Mixed_7a = D(768)
            self.Mixed_7b, self.Mixed_7c = E(1280, False), E(2048, True)
            self.fc = nn.Linear(2048, 1008)

        def forward(self, x01, resize=True):  # pytorch-fid: resize, then 2 x - 1
            x = F.interpolate(x01, size=(299, 299), mode="bilinear", align_corners=False) if resize else x01
            x = 2 * x - 1
            x = F.max_pool2d(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))), 3, stride=2)
            x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
            for name in ["5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"]:
                x = getattr(self, f"Mixed_{name}")(x)
            pool = torch.mean(x, dim=(2, 3))
            return pool, self.fc(pool)

    return torch, Net().eval()


def test_inception_matches_pytorch_fid_architecture_and_round_trips(tmp_path):
    """Random weights through the converter: same features as a torch FID Inception; npz round trip exact."""
    torch, net = _torch_fid_inception()
    rng = np.random.default_rng(0)
    state = {}
    for k, v in net.state_dict().items():
        if k.endswith("num_batches_tracked"):
            state[k] = v
        elif k.endswith("conv.weight") or k == "fc.weight":
            state[k] = torch.tensor(rng.normal(size=v.shape) * np.sqrt(2.0 / np.prod(v.shape[1:])), dtype=v.dtype)
        elif k.endswith("bn.weight") or k.endswith("running_var"):
            state[k] = torch.tensor(rng.uniform(0.5, 1.5, size=v.shape), dtype=v.dtype)
        else:
            state[k] = torch.tensor(rng.normal(size=v.shape) * 0.1, dtype=v.dtype)
    net.load_state_dict(state)
    # 75x75 is the smallest input the network takes; the 299x299 resize is compared separately below
    images = rng.uniform(-1, 1, size=(2, 75, 75, 3)).astype(np.float32)
    with torch.no_grad():
        ref = net(torch.from_numpy((images + 1) / 2).permute(0, 3, 1, 2), resize=False)
    ref_pool, ref_logits = (t.numpy() for t in ref)

    np.savez(tmp_path / "fid.npz", **inception_lib.convert_torch_state_dict(state))
    variables = inception_lib.load_inception(tmp_path / "fid.npz", logits=True)
    apply = jax.jit(inception_lib.InceptionV3FID(resize=False, logits=True, precision="highest").apply)
    pool, logits = apply(variables, jnp.asarray(images))
    np.testing.assert_allclose(pool, ref_pool, rtol=2e-4, atol=2e-4 * np.abs(ref_pool).max())
    np.testing.assert_allclose(logits, ref_logits, rtol=2e-4, atol=2e-4 * np.abs(ref_logits).max())

    small = rng.uniform(0, 1, size=(1, 3, 37, 45)).astype(np.float32)  # pytorch-fid's resize, and ours
    resized = torch.nn.functional.interpolate(torch.from_numpy(small), size=(299, 299), mode="bilinear")
    ours = inception_lib.resize_bilinear(jnp.asarray(small.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(ours, resized.numpy().transpose(0, 2, 3, 1), atol=1e-5)

    inception_lib.save_inception(tmp_path / "again.npz", variables)
    again = inception_lib.load_inception(tmp_path / "again.npz", logits=True)
    pool2, logits2 = apply(again, jnp.asarray(images))
    np.testing.assert_array_equal(pool2, pool)
    np.testing.assert_array_equal(logits2, logits)


# ============================================================================ digits
def _digits():
    from difflax.data import load_digits

    return (*load_digits("train"), *load_digits("test"))


@pytest.fixture(scope="module")
def digits_classifier(tmp_path_factory):
    cache = tmp_path_factory.mktemp("digits")
    clf = digits_lib.load_or_train_digits_classifier(_digits(), cache)
    return clf, cache


def test_digits_classifier_accuracy_determinism_and_cache(digits_classifier):
    clf, cache = digits_classifier
    assert clf.test_accuracy >= 0.95
    _, _, x_test, y_test = _digits()
    assert clf.accuracy(x_test, y_test) == clf.test_accuracy
    assert os.path.exists(cache / digits_lib.CACHE_NAME)
    cached = digits_lib.load_or_train_digits_classifier(_digits(), cache)
    retrained = digits_lib.train_digits_classifier(_digits())
    for other in (cached, retrained):  # the cache and a second training are bit-identical
        leaves = jax.tree.leaves(other.params)
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(clf.params), leaves, strict=True))
    assert clf.features(x_test[:5]).shape == (5, 64)


def test_frechet_digits_distance_ordering(digits_classifier):
    """Held-out digits << blurred digits << one digit repeated / Gaussian noise / one class only."""
    from scipy.ndimage import gaussian_filter

    clf, _ = digits_classifier
    x_train, y_train, x_test, y_test = _digits()
    ref = clf.stats(x_train)
    n = len(x_test)
    rng = np.random.default_rng(0)
    sets = {
        "held_out": x_test,
        "blurred": np.stack([gaussian_filter(im, sigma=(0.8, 0.8, 0), mode="nearest") for im in x_test]),
        "one_class": x_train[y_train == 3][:n],
        "noise": rng.normal(size=x_test.shape).astype(np.float32),
        "repeated": np.repeat(x_test[:1], n, axis=0),
    }
    fdd = {k: digits_lib.frechet_digits_distance(v, clf, ref) for k, v in sets.items()}
    print("FDD", {k: round(v, 2) for k, v in fdd.items()})
    # measured (CPU): held_out 5.6, blurred 70, noise 259, one_class 334, repeated 511
    assert 5 * fdd["held_out"] < fdd["blurred"]
    assert 2 * fdd["blurred"] < min(fdd["one_class"], fdd["noise"], fdd["repeated"])
    # the class-accuracy score, as for class-conditional samples generated for the labels y_test
    assert clf.accuracy(sets["held_out"], y_test) >= 0.95
    assert clf.accuracy(sets["repeated"], y_test) < 0.2


# ============================================================================ KID and PRDC
def test_kid_near_zero_for_same_distribution_positive_for_shift():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(1200, 16)), rng.normal(size=(1200, 16))
    mean, std = kid(a, b, n_subsets=20, subset_size=500)
    assert abs(mean) < 2 * std + 1e-3
    mean_s, std_s = kid(a, b + 0.5, n_subsets=20, subset_size=500)
    assert mean_s > 10 * std_s and mean_s > 20 * abs(mean)
    with pytest.raises(ValueError, match="subset_size"):
        kid(a[:10], b, subset_size=50)
    # the unbiased estimator on one subset equals a direct numpy computation
    x, y = rng.normal(size=(40, 5)), rng.normal(size=(40, 5)) + 0.3
    k = lambda u, v: (u @ v.T / 5 + 1) ** 3
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    direct = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (40 * 39) - 2 * kxy.mean()
    assert kid(x, y, n_subsets=3, subset_size=40)[0] == pytest.approx(direct, rel=1e-4)


def test_prdc_precision_and_recall_respond_to_shift_and_collapse():
    rng = np.random.default_rng(5)
    real = rng.normal(size=(1000, 8))
    same = prdc(real, rng.normal(size=(1000, 8)), chunk_size=256)
    shifted = prdc(real, rng.normal(size=(1000, 8)) + 1.5, chunk_size=256)
    collapsed = prdc(real, 0.1 * rng.normal(size=(1000, 8)) + real[0], chunk_size=256)
    assert same["precision"] > 0.9 and same["recall"] > 0.9 and same["coverage"] > 0.9
    assert abs(same["density"] - 1) < 0.15
    assert shifted["precision"] < same["precision"] - 0.3 and shifted["coverage"] < same["coverage"] - 0.3
    assert collapsed["precision"] > 0.9 and collapsed["recall"] < 0.05 and collapsed["coverage"] < 0.05
    # chunking does not change anything
    assert prdc(real[:300], real[300:600] + 0.2, chunk_size=64) == prdc(real[:300], real[300:600] + 0.2)


# ============================================================================ sample-based
def test_sliced_wasserstein_closed_forms():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(2000, 1))
    assert sliced_wasserstein(x, x + 1.5) == pytest.approx(1.5, rel=1e-5)  # 1-D: W2 = |m| exactly
    # unequal sizes, exact: {0, 1} vs {0, 1, 2} -> W2^2 = 1/6 + 1/3
    assert sliced_wasserstein(np.array([0.0, 1.0]), np.array([0.0, 1.0, 2.0])) == pytest.approx(np.sqrt(0.5), 1e-6)
    u, v = rng.normal(size=37), rng.gamma(2.0, size=53)
    assert sliced_wasserstein(u, v, p=1) == pytest.approx(scipy.stats.wasserstein_distance(u, v), rel=1e-5)
    # D dims, N(0, I) vs N(m, I): SW2 = |m| / sqrt(D) (each projection of z + m is exact; only theta is random)
    z = rng.normal(size=(500, 4))
    m = np.array([1.0, 2.0, 0.0, -1.0])
    assert sliced_wasserstein(z, z + m, num_projections=1000) == pytest.approx(np.linalg.norm(m) / 2, rel=0.05)
    same = sliced_wasserstein(z, rng.normal(size=(500, 4)), num_projections=1000)
    shifted = [sliced_wasserstein(z, rng.normal(size=(500, 4)) + s, num_projections=1000) for s in (0.5, 1.0)]
    assert same < 0.15 and 3 * same < shifted[0] < shifted[1]


def test_energy_distance_and_mmd():
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(500, 3)), rng.normal(size=(400, 3))
    e_same = energy_distance(x, y)
    e = [energy_distance(x, y + s) for s in (0.25, 0.5, 1.0)]
    assert abs(e_same) < 0.02 and 0.02 < e[0] < e[1] < e[2]
    a, b = rng.normal(size=60), rng.normal(size=45) + 0.4  # V-statistic form is scipy's, squared
    assert energy_distance(a, b, unbiased=False) == pytest.approx(scipy.stats.energy_distance(a, b) ** 2, rel=1e-5)
    m_same = mmd(x, y)
    m = [mmd(x, y + s) for s in (0.25, 0.5, 1.0)]
    assert abs(m_same) < 0.005 and 0.005 < m[0] < m[1] < m[2]
    # fixed bandwidths against a direct numpy U-statistic
    xs, ys = x[:50], y[:40] + 0.3
    d2 = lambda p, q: ((p[:, None] - q[None]) ** 2).sum(-1)
    kern = lambda p, q: (np.exp(-d2(p, q) / 2) + np.exp(-d2(p, q) / 8)) / 2
    kxx, kyy = kern(xs, xs), kern(ys, ys)
    direct = (kxx.sum() - 50) / (50 * 49) + (kyy.sum() - 40) / (40 * 39) - 2 * kern(xs, ys).mean()
    assert mmd(xs, ys, bandwidths=[1.0, 2.0]) == pytest.approx(direct, rel=1e-4)


def test_exact_nll_is_minus_mean_log_prob():
    means = np.array([[0.0, 0.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    gm = GaussianMixture.isotropic(jnp.asarray(means), 0.5, weights=[0.3, 0.7], event_shape=(2, 2))
    x, _ = gm.sample(jax.random.key(0), 500)
    log_prob = jax.jit(gm.log_prob)
    expected = -float(np.mean(np.asarray(log_prob(x), np.float64)))
    assert exact_nll(x, gm) == pytest.approx(expected, rel=1e-6)
    assert exact_nll(x, log_prob, bits_per_dim=True) == pytest.approx(expected / (4 * np.log(2)), rel=1e-6)
    # and the density is the mixture's: scipy's Gaussian log-densities, log-sum-exp'd
    flat = np.asarray(x, np.float64).reshape(500, 4)
    comps = [scipy.stats.multivariate_normal(mu, 0.25 * np.eye(4)).logpdf(flat) for mu in means]
    scipy_lp = scipy.special.logsumexp(np.stack(comps) + np.log([[0.3], [0.7]]), axis=0)
    assert exact_nll(x, gm) == pytest.approx(-scipy_lp.mean(), rel=1e-5)

"""The smallest end-to-end check: what CI also runs against the minimum versions in ``constraints-min.txt``.

Every subpackage imports; one sample with each solver family; one training step of a recipe;
one checkpoint written, verified and restored. Fast on purpose: it is the proof that the
lower bounds declared in ``setup.py`` hold.
"""

import importlib
import pkgutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import difflax
from difflax.analytic import GaussianMixture


def test_every_module_imports_and_no_subpackage_shadows_the_public_api():
    public = {name: getattr(difflax, name) for name in difflax.__all__}
    names = [m.name for m in pkgutil.walk_packages(difflax.__path__, "difflax.")]
    assert len(names) > 40
    for name in names:
        importlib.import_module(name)
    shadowed = [name for name, value in public.items() if getattr(difflax, name) is not value]
    assert not shadowed, f"importing a subpackage replaced difflax.{shadowed}"  # e.g. a package named like a function


@pytest.mark.parametrize("solver", ["ddim", "heun", "dpmpp_2m", "unipc", "ddpm", "adaptive"])
def test_one_sample(solver):
    process = difflax.VP()
    denoise = GaussianMixture.isotropic(jnp.array([[-2.0, 0.0], [2.0, 0.0]]), 0.5).denoiser(process)
    x_T = process.prior_sample(jax.random.key(0), (64, 2))
    run = jax.jit(lambda x: difflax.sample(denoise, process, x, solver=solver, steps=8, key=jax.random.key(1)))
    x0, info = run(x_T)
    assert x0.shape == (64, 2) and bool(jnp.all(jnp.isfinite(x0))) and int(info["nfe"]) > 0


def test_one_train_step_and_a_checkpoint_round_trip(tmp_path):
    from difflax.configs import toy2d
    from difflax.train import Trainer

    config = toy2d.get_config()
    config.model.kwargs.features, config.model.kwargs.num_blocks = 16, 1
    config.train.steps, config.train.batch_size, config.train.save_every = 1, 16, 1
    config.train.async_checkpoint = False
    trainer = Trainer(config, str(tmp_path))
    state, _ = trainer.run(progress=False)
    assert int(state.step) == 1 and trainer.checkpointer.all_steps() == [1]
    restored, meta = trainer.checkpointer.restore(trainer.init_state(), 1)
    assert meta["step"] == 1
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

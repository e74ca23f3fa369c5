"""The jobs (:mod:`difflax.cli`): recipes by name or file, the checkout's paths, and using a finished run.

``difflax-sample`` and ``difflax-evaluate`` run on a tiny class-conditional toy run; the training
job itself is tested through the command line in ``tests/test_job.py`` and ``tests/test_train.py``,
and installed from a wheel in ``tests/test_install.py``.
"""

import importlib
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from absl import flags
from PIL import Image

import difflax.configs
from difflax.cli.config_flag import define_config_flag
from difflax.configs import RECIPES, recipe_file
from difflax.train import CheckpointError, ConfigError, train_and_evaluate
from difflax.train.runs import evaluate_run, load_config, sample_run
from tests.test_train import ROOT, tiny_config


def test_recipe_names_resolve_to_the_package_files():
    package = os.path.dirname(difflax.configs.__file__)
    assert "digits" in RECIPES and "toy2d" in RECIPES and "__init__" not in RECIPES
    assert recipe_file("digits") == os.path.join(package, "digits.py")
    assert recipe_file("toy2d:moons") == os.path.join(package, "toy2d.py") + ":moons"
    for path in ("configs/toy2d.py", "my_recipe.py:arg", "/abs/recipe"):
        assert recipe_file(path) == path  # a file path is ml_collections' business
    with pytest.raises(ValueError, match=r"unknown recipe 'digitz'; the recipes are cifar10_ddpmpp, .*, toy2d_edm"):
        recipe_file("digitz")


def test_the_checkout_recipe_files_reexport_the_package_recipes():
    checkout = sorted(p[:-3] for p in os.listdir(ROOT / "configs") if p.endswith(".py") and p != "__init__.py")
    assert sorted({*RECIPES, "demo"}) == checkout  # demo.py configures experiments/solver_demo.py, not a job
    for name in RECIPES:
        shim = importlib.import_module(f"configs.{name}")
        assert shim.get_config is importlib.import_module(f"difflax.configs.{name}").get_config, name


@pytest.fixture
def config_flag(monkeypatch):
    """A fresh ``--config`` flag and a parser of argv (ml_collections reads overrides from ``sys.argv``)."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["job"])
    flag_values = flags.FlagValues()
    holder = define_config_flag("digits", flag_values)

    def parse(*args):
        monkeypatch.setattr(sys, "argv", ["job", *args])
        flag_values.unparse_flags()
        flag_values(sys.argv)
        return holder.value

    return parse


def test_config_flag_takes_a_name_an_argument_a_file_and_overrides(config_flag):
    assert config_flag().name == "digits"  # the default
    config = config_flag("--config=toy2d:moons", "--config.train.steps=3")
    assert (config.name, config.data.name, config.train.steps) == ("toy2d", "moons", 3)
    assert config_flag("--config=toy2d").data.name == "grid"
    config = config_flag("--config=configs/toy2d_edm.py", "--config.model.kwargs.features=8")
    assert (config.name, config.model.kwargs.features) == ("toy2d_edm", 8)
    with pytest.raises(flags.IllegalFlagValueError, match=r"--config=digitz: unknown recipe 'digitz'; the recipes"):
        config_flag("--config=digitz")


def test_importing_the_jobs_defines_no_flags_and_leaves_sigterm_alone():
    """A job defines its flags and notes SIGTERM when it runs; importing all of them in one process is fine."""
    names, handler = set(flags.FLAGS), signal.getsignal(signal.SIGTERM)
    for job in ("train", "sample", "evaluate", "encode_latents", "train_vae"):
        importlib.import_module(f"difflax.cli.{job}")
    assert set(flags.FLAGS) == names and signal.getsignal(signal.SIGTERM) is handler


EARLY_SIGTERM = """
import atexit, runpy, signal, sys

handled = []  # at the first import of jax: is a SIGTERM handler installed?

class Spy:
    def find_spec(self, name, path=None, target=None):
        if name == "jax" and not handled:
            handled.append(signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL)

sys.meta_path.insert(0, Spy())
atexit.register(lambda: print("handler before jax:", handled))
sys.argv = ["experiments/main.py", "--config=digitz"]
runpy.run_module("experiments.main", run_name="__main__")
"""


def test_checkout_train_path_handles_sigterm_before_jax_and_names_the_recipes():
    """``python -m experiments.main`` installs the preemption notice before JAX is imported (deterministic form of
    test_job's startup SIGTERM test), and an unknown recipe exits 1 with one line listing the recipes."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(EARLY_SIGTERM)], cwd=ROOT, capture_output=True,
                            text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "handler before jax: [True]" in result.stdout, result.stdout
    error = next(line for line in result.stderr.splitlines() if "digitz" in line)
    assert error.endswith(f"unknown recipe 'digitz'; the recipes are {', '.join(RECIPES)} (or give the path of a "
                          ".py file that defines get_config)"), error


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """10 steps of a class-conditional MLP on the two moons, through the real job (sample grid at step 5)."""
    workdir = tmp_path_factory.mktemp("run")
    config = tiny_config(steps=10, save_every=5)
    config.data.name = "moons"
    config.model.class_conditional = True
    config.eval.every = 5
    results = train_and_evaluate(config, str(workdir))
    assert results["step"] == 10
    return workdir


def test_the_job_leaves_a_run_that_can_be_read_back(run):
    for name in ("config.json", "samples.png", "loss.png", "metrics.json", "samples/step_0000005.png"):
        assert (run / name).is_file(), name
    assert not (run / "LOCK").exists()  # released
    config = load_config(str(run))
    assert config.data.name == "moons" and config.model.class_conditional
    assert isinstance(config.model.kwargs.to_dict(), dict)


def test_sample_writes_png_npz_and_trajectory(run):
    paths = sample_run(str(run), "latest", solver="euler", steps=4, guidance_scale=2.0, num=50, seed=3,
                       trajectory=True)
    data = np.load(paths["npz"])
    assert data["x"].shape == (50, 2) and np.isfinite(data["x"]).all()
    np.testing.assert_array_equal(data["labels"], np.arange(50) % 2)
    gif = Image.open(paths["gif"])
    assert gif.n_frames == 5  # x_T and the 4 steps
    assert Image.open(paths["png"]).size[0] > 500
    again = np.load(sample_run(str(run), 5, solver="euler", steps=4, guidance_scale=2.0, num=50, seed=3)["npz"])
    assert not np.array_equal(again["x"], data["x"])  # another checkpoint, other samples
    best = np.load(sample_run(str(run), "best", solver="euler", steps=4, num=50, seed=3)["npz"])
    assert np.isfinite(best["x"]).all()
    with pytest.raises(CheckpointError, match=r"no checkpoint 7; it has \[5, 10\]"):
        sample_run(str(run), 7)
    with pytest.raises(ConfigError, match=r"config\.sample\.solver = 'fast'"):
        sample_run(str(run), solver="fast")


def test_evaluate_reports_mean_and_std_over_seeds(run):
    report = evaluate_run(str(run), seeds=(0, 1), num_samples=200, batch_size=100, steps=4)
    on_disk = json.loads((run / "eval.json").read_text())
    assert on_disk == report
    assert report["step"] == 10 and report["seeds"] == [0, 1]
    for name in ("fd", "kid", "precision", "recall", "sliced_wasserstein"):
        m = report["metrics"][name]
        assert len(m["per_seed"]) == 2 and np.isfinite(m["mean"]) and m["std"] >= 0, name
    assert report["metrics"]["fd"]["per_seed"][0] != report["metrics"]["fd"]["per_seed"][1]  # seeds differ


def test_entry_points_from_the_command_line(run, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-m", "experiments.sample", f"--workdir={run}", "--num=8", "--steps=3", "--seed=1"],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "step10_heun3_seed1.png" in result.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "difflax.cli.evaluate", f"--workdir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=300,
    )
    assert missing.returncode == 1 and "config.json does not exist" in missing.stderr.splitlines()[-1]

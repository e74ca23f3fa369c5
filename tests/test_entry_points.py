"""Using a finished run: ``experiments.sample`` and ``experiments.evaluate`` on a tiny class-conditional toy run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from difflax.train import CheckpointError, ConfigError, train_and_evaluate
from difflax.train.runs import evaluate_run, load_config, sample_run
from tests.test_train import ROOT, tiny_config


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
        [sys.executable, "-m", "experiments.evaluate", f"--workdir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=300,
    )
    assert missing.returncode == 1 and "config.json does not exist" in missing.stderr.splitlines()[-1]

"""Installing difflax the way users do, in one fresh virtual environment: the notebooks' Colab install cell,
then the jobs of the installed package run outside any checkout.

The first code cell of every notebook is the same install cell. The test runs it the way
IPython would (``!cmd`` through the shell, ``%pip`` as pip for the running interpreter, with
``{expr}`` expanded in the caller's namespace) in a fresh venv and an empty directory, with
two offline substitutions: ``git clone`` of the declared URL copies this checkout's working tree
(tracked files and untracked ones git does not ignore: what the next commit holds) into the folder
the URL names, and pip runs with ``--no-index --no-deps`` (the venv sees this environment's
packages, difflax left out, through a ``.pth`` file). A form pip would look up on the package index
(a bare ``difflax``) fails here as it failed on Colab; the installed package must come from the
clone, not the checkout. ``%pip install <folder>`` builds a wheel and installs it (not editable),
so the same venv then shows what ``pip install`` gives a user: the console scripts, and
``difflax-train``, run from an empty directory, trains a tiny recipe given by name.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "colabs").glob("*.ipynb"))


def _declared_url() -> str:
    text = (ROOT / "setup.py").read_text()
    return re.search(r'^\s*url="([^"]+)"', text, re.M).group(1)


def _install_cell(path) -> str:
    nb = nbformat.read(path, as_version=4)
    return next(cell.source for cell in nb.cells if cell.cell_type == "code")


def test_every_notebook_installs_from_the_declared_source():
    cells = {path.stem: _install_cell(path) for path in NOTEBOOKS}
    common = cells["quickstart"]
    url = _declared_url()
    assert f"git clone -q --depth 1 {url}\n" in common, (url, common)
    for name, cell in cells.items():
        assert cell.startswith(common), f"colabs/{name}.ipynb does not start with the install cell of quickstart"


RUNNER = """
import json, os, shlex, shutil, subprocess, sys
from IPython.core.inputtransformer2 import TransformerManager
from IPython.utils.text import DollarFormatter

SOURCE, URL = sys.argv[1], sys.argv[2]
calls = []

class Shell:
    def system(self, cmd):  # !cmd
        calls.append(cmd)
        if cmd.startswith("git clone") and cmd.endswith(URL):
            shutil.copytree(SOURCE, URL.rstrip("/").split("/")[-1])  # the folder git would clone the URL into
        else:
            subprocess.run(cmd, shell=True, check=True)

    def run_line_magic(self, name, line):  # %pip
        assert name == "pip", name
        frame = sys._getframe(1)
        line = DollarFormatter().format(line, **{**frame.f_globals, **frame.f_locals})
        calls.append(f"%pip {line}")
        subprocess.run([sys.executable, "-m", "pip", *shlex.split(line), "--no-index", "--no-deps",
                        "--no-build-isolation"], check=True)

get_ipython = Shell
source = TransformerManager().transform_cell(open(sys.argv[3]).read())
exec(compile(source, "install-cell", "exec"), {"get_ipython": get_ipython})
import difflax, configs.digits
print(json.dumps({"calls": calls, "difflax": difflax.__file__, "configs": configs.digits.__file__}))
"""


# The smallest run of a recipe: 2 steps of a narrow MLP on the two moons, a short sampler, few samples.
TINY_RUN = ("--config=toy2d:moons", "--config.train.steps=2", "--config.train.batch_size=8",
            "--config.model.kwargs.features=16", "--config.model.kwargs.num_blocks=1", "--config.train.save_every=2",
            "--config.train.log_every=1", "--config.eval.num_samples=32", "--config.eval.every=0",
            "--config.sample.steps=2")


def _working_tree(dest: Path) -> Path:
    """A copy of the files of this checkout that the next commit would hold."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():  # a tracked file deleted in the working tree is left out
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


@pytest.mark.slow
def test_the_install_cell_installs_from_a_clone_and_the_jobs_run_without_a_checkout(tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)  # pip and setuptools come with the other packages
    python = env_dir / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    deps = tmp_path / "deps"  # this environment's packages, difflax itself left out
    deps.mkdir()
    for folder in {Path(p) for p in sys.path if p.endswith("site-packages")}:
        for entry in folder.iterdir():
            if "difflax" not in entry.name and not (deps / entry.name).exists():
                (deps / entry.name).symlink_to(entry)
    Path(site, "deps.pth").write_text(f"{deps}\n")  # after the venv's own site-packages
    cell = tmp_path / "cell.py"
    cell.write_text(_install_cell(ROOT / "colabs" / "quickstart.ipynb"))
    work = tmp_path / "colab"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    source = _working_tree(tmp_path / "source")
    result = subprocess.run([str(python), "-c", textwrap.dedent(RUNNER), str(source), _declared_url(), str(cell)],
                            cwd=work, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["calls"][0].startswith("git clone") and report["calls"][1].startswith("%pip install -q /")
    assert list(Path(site).glob("difflax-*.dist-info")), report  # installed into the venv, from the clone
    clone = str(work / "difflax")
    assert report["difflax"].startswith(clone) and report["configs"].startswith(clone), report

    # The installed wheel (not an editable install) holds the recipes and the jobs; a checkout's paths stay there.
    (dist_info,) = Path(site).glob("difflax-*.dist-info")
    assert not json.loads((dist_info / "direct_url.json").read_text())["dir_info"].get("editable")
    assert Path(site, "difflax", "configs", "toy2d.py").is_file() and Path(site, "difflax", "cli", "train.py").is_file()
    assert not Path(site, "configs").exists() and not Path(site, "experiments").exists()
    elsewhere = tmp_path / "elsewhere"  # no checkout or clone on the path: console scripts import the installed wheel
    elsewhere.mkdir()
    env["JAX_PLATFORMS"] = "cpu"
    bin_dir = env_dir / "bin"
    train = subprocess.run([str(bin_dir / "difflax-train"), "--workdir=run", *TINY_RUN], cwd=elsewhere,
                           capture_output=True, text=True, env=env, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    for name in ("config.json", "metrics.json", "samples.png", "loss.png"):
        assert (elsewhere / "run" / name).is_file(), name
    assert json.loads((elsewhere / "run" / "metrics.json").read_text())["step"] == 2
    for job in ("sample", "evaluate", "encode-latents", "train-vae"):  # run in tests/test_entry_points.py (python -m)
        assert (bin_dir / f"difflax-{job}").is_file(), job

"""Install entry for difflax: ``pip install -e .[dev]`` in a checkout, or ``pip install <folder or git URL>``."""

from setuptools import find_packages, setup

setup(
    name="difflax",
    version="0.1.0",
    description="A JAX toolkit for diffusion and flow models: processes, samplers, guidance, distillation, models.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    license_files=["LICENSE"],
    url="https://github.com/difflax/difflax",
    project_urls={
        "Source": "https://github.com/difflax/difflax",
        "Issues": "https://github.com/difflax/difflax/issues",
        "Notebooks": "https://github.com/difflax/difflax/tree/main/colabs",
    },
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Intended Audience :: Science/Research",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    python_requires=">=3.11",
    # difflax.configs (the recipes) and difflax.cli (the jobs) included: no checkout needed.
    packages=find_packages(include=["difflax", "difflax.*"]),
    entry_points={
        "console_scripts": [
            "difflax-train = difflax.cli.train:run",
            "difflax-sample = difflax.cli.sample:run",
            "difflax-evaluate = difflax.cli.evaluate:run",
            "difflax-encode-latents = difflax.cli.encode_latents:run",
            "difflax-train-vae = difflax.cli.train_vae:run",
        ]
    },
    # Lower bounds are tested: CI installs exactly constraints-min.txt and runs tests/test_smoke.py.
    install_requires=[
        "jax>=0.7.0",
        "chex>=0.1.89",
        "diffrax>=0.7.0",
        "flax>=0.11.0",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11.20",
        "ml-collections>=1.0.0",
        "absl-py>=2.1.0",
        "numpy>=1.26.4",
        "scikit-learn>=1.4.2",
        "matplotlib>=3.8.4",
        "tqdm>=4.66.1",
        "safetensors>=0.4.3",  # difflax.hub reads pretrained weights with its NumPy API (no torch)
    ],
    extras_require={
        "dev": [
            "pytest>=8.0",
            "pytest-xdist>=3.5",
            "hypothesis>=6.100",
            "scipy>=1.11",
            "ruff>=0.6",
            # tests/test_notebooks.py executes colabs/*.ipynb; compose.ipynb uses Equinox.
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6.29",
            "equinox>=0.11",
            # tests/test_install.py builds a wheel without build isolation (no index at test time);
            # setuptools builds wheels by itself from 70.1 on.
            "setuptools>=70.1",
        ],
        "tfds": ["tensorflow-datasets>=4.9.7", "grain>=0.2.2"],
        # CPU torch must be installed first (pip install torch==2.13.0) so that this
        # extra does not pull a CUDA build.
        "bench": ["torch", "diffusers>=0.30", "scipy>=1.11"],
    },
)

"""In a checkout, ``python -m experiments.train_vae`` runs :mod:`difflax.cli.train_vae`."""

from difflax.cli.train_vae import run

if __name__ == "__main__":
    run()

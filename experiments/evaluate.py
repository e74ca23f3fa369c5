"""In a checkout, ``python -m experiments.evaluate`` runs :mod:`difflax.cli.evaluate`."""

from difflax.cli.evaluate import run

if __name__ == "__main__":
    run()

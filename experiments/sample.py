"""In a checkout, ``python -m experiments.sample`` runs :mod:`difflax.cli.sample`."""

from difflax.cli.sample import run

if __name__ == "__main__":
    run()

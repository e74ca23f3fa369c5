"""In a checkout, ``python -m experiments.encode_latents`` runs :mod:`difflax.cli.encode_latents`."""

from difflax.cli.encode_latents import run

if __name__ == "__main__":
    run()

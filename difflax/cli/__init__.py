"""Command-line jobs, installed as console scripts; each is also ``python -m difflax.cli.<module>``.

* ``difflax-train`` (:mod:`~difflax.cli.train`): train, sample and evaluate a recipe.
* ``difflax-sample`` (:mod:`~difflax.cli.sample`): sample from a run's checkpoint.
* ``difflax-evaluate`` (:mod:`~difflax.cli.evaluate`): the seeded evaluation of a run.
* ``difflax-encode-latents`` (:mod:`~difflax.cli.encode_latents`): encode a dataset with a VAE.
* ``difflax-train-vae`` (:mod:`~difflax.cli.train_vae`): train a small VAE to encode with.

``--config`` takes a recipe of :mod:`difflax.configs` by name or a recipe file
(:mod:`difflax.cli.config_flag`).
"""

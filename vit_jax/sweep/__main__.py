"""python -m vit_jax.sweep: see vit_jax/sweep/__init__.py."""

from vit_jax.sweep.cli import cli

cli()

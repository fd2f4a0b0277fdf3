"""rvlf_jax: RVLF (reinforcing vision-language framework) for gloss-free sign language translation, in JAX."""

__version__ = '0.1.0'

"""Measured comparisons of rvlf_jax with the tools its users would otherwise pick.

  python -m benchmarks.run [--quick] [--only=bench_train,bench_rewards] [--out=PATH]

writes benchmarks/BENCHMARKS.md; `python -m benchmarks.<module> [--quick]` runs one benchmark and
prints its section. See `benchmarks.common` for what every benchmark shares.
"""

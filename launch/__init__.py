"""Thin absl entry points: each parses flags and calls one rvlf_jax library function."""

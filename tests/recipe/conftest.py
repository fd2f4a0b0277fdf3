"""One tiny run of the whole recipe, shared by the recipe, translate and export tests."""

import dataclasses

import pytest

from configs import synthsign
from rvlf_jax.recipe import run


@dataclasses.dataclass
class TinyRun:
  config: object
  workdir: str
  results: dict
  log: list


@pytest.fixture(scope='session')
def tiny_run(tmp_path_factory) -> TinyRun:
  """`launch.train --config=configs/synthsign.py:tiny --stage=all`, run once per session."""
  workdir = str(tmp_path_factory.mktemp('tiny_run'))
  config = synthsign.get_config('tiny')
  lines = []
  results = run.run(config, workdir, ('represent', 'sft', 'grpo'), log=lines.append)
  return TinyRun(config, workdir, results, lines)

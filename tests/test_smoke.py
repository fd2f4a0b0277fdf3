"""The README's main command (for now the model smoke demo) and the configs it uses."""

import pytest

import jax

from configs import smoke as smoke_config
from rvlf_jax import smoke
from rvlf_jax.models import decoder


@pytest.mark.parametrize('family', ['qwen3', 'gemma2'])
def test_smoke_demo_runs_and_checks_itself(family, capsys):
  results = smoke.run(smoke_config.get_config(family))
  assert results['cached_agrees'] and results['roundtrip_equal']
  assert 'greedy tokens' in capsys.readouterr().out


def test_smoke_config_builds_every_family():
  for family in ['llama', 'qwen2', 'qwen3', 'gemma2', 'gemma3']:
    config = smoke_config.get_config(family)
    shapes = decoder.abstract_params(decoder.DecoderConfig.tiny(config.family))
    assert jax.tree.leaves(shapes)

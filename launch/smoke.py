"""Model-zoo smoke demo: `python -m launch.smoke --config=configs/smoke.py[:family]`."""

from absl import app
from ml_collections import config_flags

from rvlf_jax import smoke

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/smoke.py', 'Demo configuration.',
                                          lock_config=True)


def main(argv):
  del argv
  results = smoke.run(_CONFIG.value)
  if not (results['cached_agrees'] and results['roundtrip_equal']):
    raise SystemExit('smoke demo found a mismatch (see above)')


if __name__ == '__main__':
  app.run(main)

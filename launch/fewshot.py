r"""Few-shot isolated sign recognition with DVLA-RL on SynthSign.

  python -m launch.fewshot --config=configs/fewshot_synthsign.py --workdir=/tmp/fewshot
  python -m launch.fewshot --config=configs/fewshot_synthsign.py:table --workdir=/tmp/fewshot

Prints 5-way 1-shot and 5-shot accuracy with 95% CIs per method; writes WORKDIR/results.json,
results.md and semantics.json (`rvlf_jax.fewshot.experiment`). Data, the text encoder and the
pool cache in WORKDIR are reused by a rerun.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from rvlf_jax.fewshot import experiment

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/fewshot_synthsign.py',
                                          'Few-shot config.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Folder of the run (created).', required=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  experiment.run(_CONFIG.value, _WORKDIR.value, log=lambda line: print(line, flush=True))


if __name__ == '__main__':
  app.run(main)

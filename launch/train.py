r"""Trains a sign language translator with the RVLF recipe.

  python -m launch.train --config=configs/synthsign.py --workdir=/tmp/rvlf
  python -m launch.train --config=configs/synthsign.py --workdir=/tmp/rvlf --stage=sft
  python -m launch.train --config=configs/synthsign.py:skeleton_only --workdir=/tmp/rvlf-sk \
      --config.seed=1 --config.sft.steps=3000

--stage: 'all' (represent, sft, grpo), one stage, a comma-separated list, or 'control' (SFT
continued from its best checkpoint for the GRPO stage's training time). A stage that is not the
first needs the previous stage's checkpoint in the same workdir. Rerunning a command resumes it
where it stopped. At the end the scores are printed as a table and written to
WORKDIR/results.json.
"""

import logging as std_logging
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from rvlf_jax.recipe import build
from rvlf_jax.recipe import stages as stages_lib
from rvlf_jax.train import loop

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/synthsign.py', 'Recipe config.')
_WORKDIR = flags.DEFINE_string('workdir', None,
                               'Folder of the run (created; resumed if it exists).', required=True)
_STAGE = flags.DEFINE_string('stage', 'all',
                             "'all', or stages among represent,sft,grpo,control (comma-separated).")
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False,
    'Multi-host: call jax.distributed.initialize() before anything else. On a TPU pod or a '
    'SLURM/Open MPI cluster it finds its peers by itself; elsewhere give the three flags below.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'With --distributed off TPU: host:port of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None,
                                      'With --distributed off TPU: how many processes in all.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None,
                                   'With --distributed off TPU: this process, 0-based.')


def initialize_distributed() -> None:
  """jax.distributed.initialize() as the flags ask (a no-op without --distributed)."""
  explicit = {'coordinator_address': _COORDINATOR.value, 'num_processes': _NUM_PROCESSES.value,
              'process_id': _PROCESS_ID.value}
  given = {k: v for k, v in explicit.items() if v is not None}
  if not _DISTRIBUTED.value:
    if given:
      raise app.UsageError(f'--{", --".join(given)} need --distributed.')
    return
  if given and len(given) != len(explicit):
    missing = sorted(set(explicit) - set(given))
    raise app.UsageError(f'--distributed with {sorted(given)} also needs --{", --".join(missing)}.')
  jax.distributed.initialize(**given)


def parse_stages(value: str) -> tuple[str, ...]:
  """'all' -> the recipe's stages; 'sft,grpo' -> ('sft', 'grpo'); also 'control'."""
  return build.parse_stages(value, extra=('control',))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # Our progress lines (loop, data layer) at INFO; libraries (orbax's per-save lines) at WARNING.
  logging.set_verbosity(logging.WARNING)
  ours = std_logging.getLogger('rvlf_jax')
  ours.setLevel(std_logging.INFO)
  handler = std_logging.StreamHandler(sys.stderr)
  handler.setFormatter(std_logging.Formatter('%(asctime)s %(message)s', '%H:%M:%S'))
  ours.addHandler(handler)
  ours.propagate = False
  initialize_distributed()
  if jax.process_index() != 0:
    ours.setLevel(std_logging.WARNING)  # progress lines from process 0 only
  from rvlf_jax.recipe import run  # pylint: disable=g-import-not-at-top  (after flag parsing)
  try:
    stages = parse_stages(_STAGE.value)
    run.run(_CONFIG.value, _WORKDIR.value, stages,
            log=lambda line: print(line, flush=True))
  except (build.ConfigError, stages_lib.MissingCheckpointError) as e:
    sys.exit(f'launch.train: {e}')
  except loop.NonFiniteLossError as e:
    sys.exit(f'launch.train: {e}')


if __name__ == '__main__':
  app.run(main)

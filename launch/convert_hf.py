r"""Converts an HF model folder to an rvlf_jax orbax checkpoint, or such a checkpoint back.

The direction follows from what --src holds: config.json (an HF folder, e.g. from
`save_pretrained`) converts to an orbax checkpoint; model_config.json (a checkpoint written by
this tool or `rvlf_jax.hf.checkpoint.save_checkpoint`) converts to an HF folder that
`transformers` loads with `from_pretrained`.

  python -m launch.convert_hf --src=/models/Qwen3-8B --dst=/ckpt/qwen3_8b
  python -m launch.convert_hf --src=/ckpt/qwen3_8b --dst=/export/qwen3_8b --max_shard_size=2GB

Prints one line: direction, model type, parameter count, dtype and destination.
"""

import sys

from absl import app
from absl import flags
from absl import logging

from rvlf_jax.hf import ConversionError, checkpoint

_SRC = flags.DEFINE_string('src', None, 'HF folder (config.json) or orbax checkpoint '
                           '(model_config.json).', required=True)
_DST = flags.DEFINE_string('dst', None, 'Destination folder, written atomically.', required=True)
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace an existing destination.')
_MAX_SHARD_SIZE = flags.DEFINE_string(
    'max_shard_size', '5GB', 'Largest safetensors shard of an HF export: bytes, or with a unit '
    '(500MB, 5GB = 5e9 bytes, 2GiB).')
_DTYPE = flags.DEFINE_enum('dtype', None, ['float32', 'bfloat16', 'float16'],
                           'Cast floating parameters to this dtype; default: keep theirs.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    # app.run turns INFO on, and orbax logs every stage of a save or restore at INFO.
    logging.set_verbosity(logging.WARNING)
  try:
    max_shard_bytes = checkpoint.parse_size(_MAX_SHARD_SIZE.value)
  except ValueError as e:
    raise app.UsageError(f'--max_shard_size: {e}') from e
  try:
    result = checkpoint.convert_folder(_SRC.value, _DST.value, overwrite=_OVERWRITE.value,
                                       max_shard_bytes=max_shard_bytes, dtype=_DTYPE.value)
  except (ConversionError, FileExistsError) as e:
    # Bad input, not a bug: the message names the file; a traceback would bury it.
    sys.exit(f'convert_hf: {e}')
  print(result.summary())


if __name__ == '__main__':
  app.run(main)

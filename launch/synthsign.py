r"""Generates, caches and describes the SynthSign benchmark.

  python -m launch.synthsign --size=default --out=/data/synthsign [--seed=0] [--describe]

Writes the skeleton cache (meta.json, {split}.jsonl, {split}-NNNN-*.npy) into --out; with
--describe (the default) also prints the dataset's statistics and writes describe.json and a sample
GIF there. Load it with `rvlf_jax.data.synthsign.SynthSign.load(out)`.
"""

from absl import app
from absl import flags

from rvlf_jax.data.synthsign import SIZES, prepare

_SIZE = flags.DEFINE_enum('size', 'default', list(SIZES), 'Dataset size.')
_OUT = flags.DEFINE_string('out', None, 'Output folder.', required=True)
_SEED = flags.DEFINE_integer('seed', 0, 'Dataset seed.')
_DESCRIBE = flags.DEFINE_bool('describe', True, 'Print statistics and write a sample GIF.')
_WORKERS = flags.DEFINE_integer('workers', None, 'Generator processes (default: all cores).')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 64, 'Frame side in pixels.')
_FPS = flags.DEFINE_float('fps', 12.0, 'Frames per second.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  prepare(_SIZE.value, _OUT.value, _SEED.value, describe_too=_DESCRIBE.value,
          workers=_WORKERS.value, image_size=_IMAGE_SIZE.value, fps=_FPS.value)


if __name__ == '__main__':
  app.run(main)

r"""Exports a trained translator: HF decoder (LoRA merged) + tokenizer, DINOv2, sign encoder.

  python -m launch.export_hf --checkpoint=/tmp/rvlf --out=/tmp/rvlf-export
  python -m launch.export_hf --checkpoint=/tmp/rvlf --checkpoint_stage=sft --out=/tmp/rvlf-sft \
      --overwrite

--checkpoint is the --workdir of a launch.train run; --checkpoint_stage picks its GRPO or SFT
translator (default: GRPO if it was trained, else SFT), at its best dev BLEU-4. OUT gets decoder/
(an HF folder transformers loads), dinov2/ (when the model reads frames), sign_encoder.safetensors,
sign_config.json and a README.md saying how to load each (`rvlf_jax.recipe.export.export`). A
non-empty OUT is replaced only with --overwrite. Prints the folder it wrote. """

import sys

from absl import app
from absl import flags
from absl import logging

# See launch/translate.py: these names are defined by other launchers too.
_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'The --workdir of a launch.train run.',
                                  allow_override=True)
_STAGE = flags.DEFINE_enum('checkpoint_stage', None, ['sft', 'grpo'],
                           'Which translator; default: grpo if trained, else sft.',
                           allow_override=True)
_OUT = flags.DEFINE_string('out', None, 'The export folder (written atomically).',
                           allow_override=True)
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace a non-empty --out.',
                               allow_override=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not _CHECKPOINT.value or not _OUT.value:
    sys.exit('launch.export_hf: --checkpoint=WORKDIR and --out=DIR are both required.')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every step of a restore at INFO
  # pylint: disable-next=g-import-not-at-top  (jax, orbax, transformers: --help stays fast)
  from rvlf_jax.recipe import artifacts, export as export_lib
  log = lambda line: print(line, file=sys.stderr, flush=True)
  try:
    translator = artifacts.load_translator(_CHECKPOINT.value, _STAGE.value, log=log)
    out = export_lib.export(translator, _OUT.value, overwrite=_OVERWRITE.value)
  except (ValueError, OSError) as e:
    sys.exit(f'launch.export_hf: {e}')
  print(out)


if __name__ == '__main__':
  app.run(main)

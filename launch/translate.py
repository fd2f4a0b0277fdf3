r"""Translates one sign-language clip with a trained checkpoint.

  python -m launch.translate --checkpoint=/tmp/rvlf --pose=clip.pose --frames=clip_frames/
  python -m launch.translate --checkpoint=/tmp/rvlf --checkpoint_stage=sft --pose=clip.pkl \
      --video=clip.mp4

--checkpoint is the --workdir of a launch.train run; --checkpoint_stage picks its GRPO or SFT
translator (default: GRPO if it was trained, else SFT), restored at its best dev BLEU-4. A model
that reads keypoints needs --pose (a .pose file or an RTMPose .pkl: no pose estimator ships with
rvlf_jax); one that reads frame features needs --video (a video file) or --frames (a folder of frame
images). Decoding follows the run's config (eval.decode) unless --decode says otherwise. Progress
goes to stderr; the last line of stdout is the translation. Bad input ends it with a one-line
message and exit code 1. """

import sys

from absl import app
from absl import flags
from absl import logging

# Flag names that other launchers define too (--checkpoint, --decode, --beam_size here;
# --out, --overwrite in export_hf and launch.synthsign) would collide when
# several launchers are imported into one process, as tests do; allow_override lets the last
# definition stand. Run alone, each launcher has only its own.
_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'The --workdir of a launch.train run.',
                                  allow_override=True)
_STAGE = flags.DEFINE_enum('checkpoint_stage', None, ['sft', 'grpo'],
                           'Which translator; default: grpo if trained, else sft.',
                           allow_override=True)
_POSE = flags.DEFINE_string('pose', None, 'Pose file of the clip (.pose or RTMPose .pkl).')
_VIDEO = flags.DEFINE_string('video', None, 'Video file of the clip.')
_FRAMES = flags.DEFINE_string('frames', None, 'Folder of the clip\'s frame images.')
_DECODE = flags.DEFINE_enum('decode', None, ['greedy', 'beam'],
                            'Decoding; default: the config\'s eval.decode.', allow_override=True)
_BEAM_SIZE = flags.DEFINE_integer('beam_size', None,
                                  'Beam size; default: the config\'s eval.beam_size.',
                                  allow_override=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not _CHECKPOINT.value:
    sys.exit('launch.translate: --checkpoint=WORKDIR (a launch.train workdir) is required.')
  if not (_POSE.value or _VIDEO.value or _FRAMES.value):
    sys.exit('launch.translate: give the clip: --pose=FILE and/or --video=FILE or --frames=DIR.')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every step of a restore at INFO
  # pylint: disable-next=g-import-not-at-top  (jax, orbax, transformers: --help stays fast)
  from rvlf_jax.recipe import artifacts
  log = lambda line: print(line, file=sys.stderr, flush=True)
  try:
    translator = artifacts.load_translator(_CHECKPOINT.value, _STAGE.value, log=log)
    text = artifacts.translate_clip(translator, pose=_POSE.value, video=_VIDEO.value,
                                    frames=_FRAMES.value, decode=_DECODE.value,
                                    beam_size=_BEAM_SIZE.value)
  except (ValueError, OSError, ImportError) as e:
    # Bad input, not a bug: the message names the file and the problem.
    sys.exit(f'launch.translate: {e}')
  if not text:
    log('the model generated eos first: the translation is empty.')
  print(text)


if __name__ == '__main__':
  app.run(main)

"""SynthSign: the project's procedural sign-language translation benchmark.

Sign videos (skeleton keypoints from a simulated pose estimator, and rendered RGB frames) of a
synthetic sign language with its own grammar, paired with English translations. Modules, one job
each:
  lexicon     glosses, categories, English forms
  grammar     meanings; sign order and non-manual marks; English paraphrases; held-out splits
  phonology   handshapes, orientations, locations, movements; one sign form per gloss
  signers     signer bodies, speed, handedness, colours
  body        face, hand and arm geometry; mirroring
  scene       timeline and motion of a signed sentence -> clean keypoints
  pose        simulated pose estimator -> noisy keypoints and scores
  render      vectorised renderer -> RGB frames
  dataset     SynthSign: examples, splits, cache
  describe    statistics and a sample GIF (Pillow)

    from rvlf_jax.data.synthsign import SynthSign
    ds = SynthSign('default', seed=0)
    ex = ds.example('train', 0)   # dict: keypoints, scores, frames, text, paraphrases, glosses, ...
"""

from rvlf_jax.data.synthsign.dataset import SIZES, SPLITS, SynthSign, SynthSignConfig
from rvlf_jax.data.synthsign.describe import describe, prepare

__all__ = ['SIZES', 'SPLITS', 'SynthSign', 'SynthSignConfig', 'describe', 'prepare']

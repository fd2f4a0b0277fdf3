"""A trained translator exported as a folder other code can use without rvlf_jax's training stack.

    translator = artifacts.load_translator('/tmp/rvlf')
    export(translator, '/tmp/rvlf-export')                   # HF decoder, DINOv2, sign encoder

writes
  decoder/                  the decoder with its LoRA adapters merged, an HF folder
                            (`transformers.AutoModelForCausalLM` / `AutoTokenizer` load it)
  dinov2/                   the frozen frame encoder, an HF folder (when the model uses frames)
  sign_encoder.safetensors  sign encoder + projector weights, names like
                            'sign_encoder/skeleton/parts/fc1_kernel' (the parameter tree's path)
  sign_config.json          the sign encoder's config, the projector's sizes, the prompt and
                            tokenizer ids, the input preprocessing and the decoding settings
  README.md                 how to load each part
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax.traverse_util
import jax
import numpy as np

from rvlf_jax.data import keypoints, pipeline, tokenizers
from rvlf_jax.hf import api as hf_api
from rvlf_jax.hf import io as hf_io
from rvlf_jax.models import lora as lora_lib
from rvlf_jax.recipe import stages as stages_lib
from rvlf_jax.recipe.artifacts import (CACHE_DTYPE, CACHE_MEAN, CACHE_STD, DECODER_DIR,
                                       ENCODER_DIR, Translator, frame_size)

EXPORT_FORMAT, EXPORT_VERSION = 'rvlf_sign_translator', 1
SIGN_WEIGHTS, SIGN_CONFIG, README = 'sign_encoder.safetensors', 'sign_config.json', 'README.md'


def merged_decoder(translator: Translator) -> Any:
  """The decoder's parameters with the stage's LoRA adapters folded into its kernels."""
  lora = translator.model.config.lora
  decoder = translator.params['decoder']
  return decoder if lora is None else lora_lib.merge(decoder, lora)


def sign_tensors(params: Any) -> dict[str, np.ndarray]:
  """The sign encoder's and projector's parameters by path ('sign_encoder/.../fc1_kernel')."""
  tree = {'sign_encoder': params['sign_encoder'], 'projector': params['projector']}
  flat = flax.traverse_util.flatten_dict(jax.device_get(tree), sep='/')
  return {k: np.ascontiguousarray(np.asarray(v)) for k, v in sorted(flat.items())}


def _jsonable(value: Any) -> Any:
  return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, 'tolist')
                               else str(v)))


def _stats_json(featurizer: pipeline.Featurizer) -> dict[str, Any] | None:
  """The keypoint statistics the featurizer standardises with, as JSON lists."""
  stats = getattr(featurizer.normalize, 'stats', None)
  if stats is None:
    return None
  return {'formula': '(x - mean) / std on detected points after normalization, 0 elsewhere',
          'mean': stats.mean.tolist(), 'std': stats.std.tolist()}


def sign_config(translator: Translator) -> dict[str, Any]:
  """The documented config of an export (`sign_config.json`)."""
  config, model_cfg, tok = translator.config, translator.model.config, translator.tokenizer
  decoder = model_cfg.decoder
  template = stages_lib.prompt_template(config)
  visual = None
  if translator.encoder is not None:
    visual = {
        'encoder': ENCODER_DIR, 'feature_keys': list(config.visual.feature_keys),
        'width': model_cfg.sign.fusion.visual_dim,
        'image_size': int(config.visual.image_size),
        'load_size': frame_size(config),
        'resize': 'bilinear with antialiasing (jax.image.resize), stretched to image_size',
        'pixel_scale': 1 / 255, 'mean': list(CACHE_MEAN), 'std': list(CACHE_STD),
        'pooling': {'cls': "the encoder's normalised CLS token",
                    'mean_patch': 'the mean of its normalised patch tokens'},
        'rounded_to': CACHE_DTYPE,
    }
  joints = config.data.joints
  return _jsonable({
      'format': EXPORT_FORMAT,
      'version': EXPORT_VERSION,
      'source': {'workdir': translator.workdir, 'stage': translator.stage,
                 'checkpoint': translator.which},
      'layout': ('The decoder reads [prompt.before_ids][sign tokens][prompt.after_ids] as input '
                 'embeddings, then generates the translation until eos. Sign tokens are '
                 'projector(sign_encoder(inputs)), one per downsample frames; padded ones are '
                 'masked out and take no position.'),
      'sign_encoder': dataclasses.asdict(model_cfg.sign),
      'downsample': model_cfg.sign.downsample,
      'projector': {'input_size': model_cfg.sign.d_model,
                    'hidden_size': model_cfg.projector_hidden or decoder.hidden_size,
                    'output_size': decoder.hidden_size,
                    'layers': 'fc1 -> gelu (tanh approximation) -> fc2, with biases'},
      'decoder': {'path': DECODER_DIR, 'hidden_size': decoder.hidden_size,
                  'vocab_size': decoder.vocab_size, 'family': decoder.family,
                  'lora_merged': model_cfg.lora is not None},
      'prompt': {'instruction': template.instruction, 'language': config.data.language,
                 'text': template.text(tok, config.data.language),
                 'before_ids': [int(i) for i in np.asarray(translator.prompt.before)],
                 'after_ids': [int(i) for i in np.asarray(translator.prompt.after)]},
      'tokenizer': {'kind': config.tokenizer.kind, 'path': DECODER_DIR,
                    'vocab_size': tok.vocab_size, 'bos_id': tok.bos_id, 'eos_id': tok.eos_id,
                    'pad_id': tok.pad_id},
      'inputs': {
          'keypoints': None if not translator.uses_keypoints else {
              'layout': 'COCO-WholeBody 133 points [T, 133, 2] in pixels, with scores [T, 133]',
              'joints': (list(keypoints.SUBSETS[joints].indices) if joints else None),
              'joint_subset': joints or None,
              'normalization': 'rvlf_jax.data.keypoints.normalize(strict=False): body relative '
                               'to the shoulders, hands relative to their wrists',
              'standardization': _stats_json(translator.featurizer),
              'channels': ['x', 'y', 'score']},
          'visual': visual,
          'max_frames': int(config.data.frame_buckets[-1]),
          'frame_buckets': list(config.data.frame_buckets),
      },
      'decode': {k: config.eval[k] for k in ('decode', 'beam_size', 'max_new_tokens',
                                             'length_penalty')},
  })


_README = """\
# RVLF sign-language translator export

Exported by `python -m launch.export_hf` from the {stage} checkpoint of `{workdir}`
(format `{format}` version {version}). Inputs, prompt and sizes are in `{config}`.

- `decoder/`: the language model with its LoRA adapters merged, and its tokenizer:

      import transformers
      model = transformers.AutoModelForCausalLM.from_pretrained('decoder')
      tokenizer = transformers.AutoTokenizer.from_pretrained('decoder')

  With rvlf_jax: `config, params = rvlf_jax.hf.api.load_hf('decoder')`.
{encoder}- `{weights}`: the sign encoder and projector weights (safetensors, numpy layout,
  names are paths in the parameter tree, e.g. `sign_encoder/skeleton/parts/fc1_kernel`):

      from safetensors.numpy import load_file
      from flax import traverse_util
      tree = traverse_util.unflatten_dict(load_file('{weights}'), sep='/')
      # tree['sign_encoder'], tree['projector']: the SignEncoder and Projector params of
      # rvlf_jax.models.fusion, built from sign_config.json's 'sign_encoder' and 'projector'.

- `{config}`: the sign encoder config, projector sizes, decoder hidden size, the prompt ids
  around the sign tokens (`prompt.before_ids`, `prompt.after_ids`), the tokenizer's ids, how
  keypoints and frames are preprocessed, and the decoding settings.

To translate: encode the clip with the sign encoder, project it, place the sign embeddings
between the prompt ids' embeddings, and generate with the decoder from those input embeddings
(`inputs_embeds`) until eos.
"""

_README_ENCODER = """\
- `{encoder}/`: the frozen DINOv2 frame encoder
  (`transformers.AutoModel.from_pretrained('{encoder}')` or `rvlf_jax.hf.api.load_hf`); how frames
  become the model's per-frame features is under `inputs.visual` in the config.
"""


def export(translator: Translator, out_dir: str, overwrite: bool = False) -> str:
  """Writes the translator as HF decoder + frame encoder + sign encoder (see the module doc).

  The folder appears complete or not at all (written beside it, then renamed).

  Args:
    translator: from `load_translator`.
    out_dir: the export folder.
    overwrite: replace a non-empty out_dir; otherwise that is an error.

  Returns:
    out_dir, absolute.

  Raises:
    FileExistsError: out_dir is not empty and overwrite is False.
  """
  out_dir = os.path.abspath(out_dir)
  if (os.path.exists(out_dir) and not overwrite
      and not (os.path.isdir(out_dir) and not os.listdir(out_dir))):
    raise FileExistsError(f'{out_dir}: exists and is not empty; refusing to overwrite it (pass '
                          'overwrite=True, or --overwrite).')
  model_cfg = translator.model.config
  config = sign_config(translator)

  def write(tmp: str) -> None:
    decoder_out = os.path.join(tmp, DECODER_DIR)
    hf_api.save_hf(model_cfg.decoder, merged_decoder(translator), decoder_out)
    tok = translator.tokenizer
    if isinstance(tok, tokenizers.SentencePieceTokenizer):
      tok.save_as_hf(decoder_out)
    elif isinstance(tok, tokenizers.HFTokenizer):
      tok.hf.save_pretrained(decoder_out)
    else:
      raise TypeError(f'cannot export a {type(tok).__name__} tokenizer.')
    if translator.encoder is not None:
      hf_api.save_hf(translator.encoder.config, translator.encoder.params,
                     os.path.join(tmp, ENCODER_DIR))
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
    save_file(sign_tensors(translator.params), os.path.join(tmp, SIGN_WEIGHTS),
              metadata={'format': EXPORT_FORMAT, 'version': str(EXPORT_VERSION)})
    with open(os.path.join(tmp, SIGN_CONFIG), 'w') as f:
      json.dump(config, f, indent=2)
      f.write('\n')
    encoder = (_README_ENCODER.format(encoder=ENCODER_DIR) if translator.encoder is not None
               else '')
    with open(os.path.join(tmp, README), 'w') as f:
      f.write(_README.format(stage=translator.stage, workdir=translator.workdir,
                             format=EXPORT_FORMAT, version=EXPORT_VERSION, config=SIGN_CONFIG,
                             weights=SIGN_WEIGHTS, encoder=encoder))

  hf_io.write_atomically(out_dir, write, overwrite=overwrite)
  translator.log(f'{out_dir}: exported the {translator.stage} translator')
  return out_dir

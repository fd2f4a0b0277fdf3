"""recipe.artifacts and recipe.export on the tiny run's workdir: restoring, a clip as the
pipeline sees it, export."""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from rvlf_jax.data import features, pipeline, poses, video
from rvlf_jax.data.synthsign import SynthSign
from rvlf_jax.eval import evaluate as evaluate_lib
from rvlf_jax.hf import api as hf_api
from rvlf_jax.models.decoder import Decoder
from rvlf_jax.recipe import artifacts, build, lm, run
from rvlf_jax.recipe import export as export_lib
from rvlf_jax.recipe import data as data_lib
from rvlf_jax.recipe import stages
from rvlf_jax.train import params as params_lib


def write_clip(config, workdir: str, folder: str, split: str = 'test', index: int = 0):
  """A SynthSign example as a user would bring it: a .pose file and a folder of PNG frames.

  Returns:
    (example with its frames, pose path, frame folder).
  """
  example = SynthSign.load(data_lib.synthsign_dir(config, workdir)).example(split, index,
                                                                            frames=True)
  pose_path = os.path.join(folder, 'clip.pose')
  poses.save_pose(poses.Pose(data=example['keypoints'][:, None],
                             confidence=example['scores'][:, None],
                             names=poses.COCO_WHOLEBODY_NAMES, fps=example['fps']), pose_path)
  frames_dir = os.path.join(folder, 'frames')
  os.makedirs(frames_dir)
  for i, image in enumerate(example['frames']):
    Image.fromarray(image).save(os.path.join(frames_dir, f'frame{i}.png'))
  return example, pose_path, frames_dir


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and np.array_equal(x, y)


@pytest.fixture(scope='module')
def translator(tiny_run):
  return artifacts.load_translator(tiny_run.workdir)


@pytest.fixture(scope='module')
def clip(tiny_run, tmp_path_factory):
  return write_clip(tiny_run.config, tiny_run.workdir, str(tmp_path_factory.mktemp('clip')))


def test_load_translator_picks_grpo_then_sft_as_the_stages_restore_them(tiny_run, translator):
  config, workdir = tiny_run.config, tiny_run.workdir
  assert translator.stage == 'grpo' and translator.which == 'best'
  assert translator.uses_keypoints and translator.uses_frames and translator.encoder is not None
  assert translator.model.config.lora == build.grpo_lora(config)
  sft = artifacts.load_translator(workdir, 'sft')
  assert sft.stage == 'sft' and sft.model.config.lora == build.lora_config(config)

  # The stages' own restore, with the pretrained decoder's real weights rather than shapes.
  ctx = dataclasses.replace(artifacts.light_context(config, workdir),
                            decoder=lm.load_pretrained(os.path.join(workdir, run.DECODER_DIR)))
  _, grpo_params = stages.restore_grpo(ctx)
  assert_trees_equal(translator.params, grpo_params)
  _, state = stages.restore_sft(ctx, 'test')
  assert_trees_equal(sft.params, params_lib.merge(state.params, state.frozen))


def test_load_translator_names_what_is_missing(tiny_run, tmp_path):
  with pytest.raises(FileNotFoundError, match=f'{tmp_path}/config.json: missing'):
    artifacts.load_translator(str(tmp_path))
  shutil.copy(os.path.join(tiny_run.workdir, run.CONFIG_FILE), tmp_path)
  with pytest.raises(stages.MissingCheckpointError,
                     match=f'{tmp_path}: neither a grpo nor an sft checkpoint'):
    artifacts.load_translator(str(tmp_path))
  with pytest.raises(stages.MissingCheckpointError, match="no 'sft' checkpoint in the workdir"):
    artifacts.load_translator(str(tmp_path), 'sft')
  with pytest.raises(ValueError, match="stage must be one of .*got 'represent'"):
    artifacts.load_translator(tiny_run.workdir, 'represent')


def test_a_clip_from_files_is_translated_as_the_pipeline_translates_it(tiny_run, translator,
                                                                      clip):
  example, pose_path, frames_dir = clip
  batch = artifacts.clip_batch(translator, artifacts.read_clip(translator, pose=pose_path,
                                                               frames=frames_dir))
  # The run's own path: the feature cache and the recipe's featurizer, one example per batch.
  cache = features.FeatureCache(os.path.join(tiny_run.workdir, data_lib.FEATURES_DIR))
  source = [{k: v for k, v in example.items() if k != 'frames'}]
  [expected] = pipeline.eval_pipeline(
      source, data_lib.featurizer(
          tiny_run.config, translator.tokenizer, cache,
          data_lib.load_keypoint_stats(tiny_run.config, tiny_run.workdir)), 1,
      pad_id=translator.tokenizer.pad_id)
  for key in ('keypoints', 'frame_mask', 'example_mask'):
    np.testing.assert_array_equal(batch[key], expected[key], err_msg=key)
  np.testing.assert_allclose(batch['visual'], expected['visual'], atol=1e-6)

  # The tiny model says eos first, so compare the greedy tokens with eos switched off too.
  def tokens(b):
    out, _ = evaluate_lib.translate_batch(
        translator.model, translator.params, evaluate_lib.model_inputs(b), translator.prompt,
        decode='greedy', beam_size=1, max_new_tokens=6, eos_id=-1, pad_id=0)
    return np.asarray(out)

  np.testing.assert_array_equal(tokens(batch), tokens(expected))
  e = tiny_run.config.eval
  [(_, hyp)] = evaluate_lib.translate(
      translator.model, translator.params, [expected], translator.prompt, translator.tokenizer,
      decode=e.decode, beam_size=e.beam_size, max_new_tokens=e.max_new_tokens,
      length_penalty=e.length_penalty)
  assert artifacts.translate_clip(translator, pose=pose_path, frames=frames_dir) == hyp


def test_missing_both_and_mismatched_inputs(translator, clip):
  example, pose_path, frames_dir = clip
  with pytest.raises(ValueError, match='reads keypoints: give a pose file .*no pose estimator'):
    artifacts.translate_clip(translator, frames=frames_dir)
  with pytest.raises(ValueError, match="reads frame features: give the clip's video"):
    artifacts.translate_clip(translator, pose=pose_path)
  with pytest.raises(ValueError, match='either video= .* or frames= .*not both'):
    artifacts.translate_clip(translator, pose=pose_path, video=frames_dir, frames=frames_dir)
  with pytest.raises(poses.PoseError, match='nowhere.pose: no such file'):
    artifacts.translate_clip(translator, pose=os.path.join(frames_dir, 'nowhere.pose'),
                             frames=frames_dir)

  lines = []
  logged = dataclasses.replace(translator, log=lines.append)
  t = len(example['keypoints'])
  clip_in = artifacts.read_clip(logged, pose=pose_path, frames=example['frames'][::2])
  assert clip_in.num_frames == t and clip_in.visual['cls'].shape[0] == t
  assert any(f'frames but {t} pose frames; resampled the frames uniformly to {t}' in line
             for line in lines), lines


def test_a_video_file_reads_like_its_frame_folder(translator, clip, tmp_path):
  example, pose_path, frames_dir = clip
  path = str(tmp_path / 'clip.mp4')
  video.write_video(path, example['frames'], fps=example['fps'])
  from_video = artifacts.read_clip(translator, pose=pose_path, video=path)
  from_pngs = artifacts.read_clip(translator, pose=pose_path, frames=frames_dir)
  for key, features_png in from_pngs.visual.items():
    # mpeg4 is lossy, so the features agree closely rather than exactly.
    assert from_video.visual[key].shape == features_png.shape
    r = np.corrcoef(from_video.visual[key].ravel(), features_png.ravel())[0, 1]
    assert r > 0.95, (key, r)


def test_export_loads_in_transformers_and_holds_the_sign_encoder(translator, tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

  out = export_lib.export(translator, str(tmp_path / 'export'))
  decoder_dir = os.path.join(out, 'decoder')
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(decoder_dir, dtype=torch.float32)
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(decoder_dir)
  text = 'the weather is nice today'
  assert hf_tokenizer.encode(text, add_special_tokens=False) == translator.tokenizer.encode(text)
  ids = np.concatenate([translator.prompt.before, translator.prompt.after,
                        translator.tokenizer.encode(text)]).astype(np.int32)[None]
  with torch.no_grad():
    theirs = hf_model(torch.from_numpy(ids).long()).logits.numpy()
  ours = Decoder(translator.model.config.decoder).apply(
      {'params': export_lib.merged_decoder(translator)}, ids).logits
  np.testing.assert_allclose(theirs, np.asarray(ours), atol=1e-4, rtol=0)

  saved = load_file(os.path.join(out, export_lib.SIGN_WEIGHTS))
  expected = export_lib.sign_tensors(translator.params)
  assert 'sign_encoder/skeleton/parts/fc1_kernel' in saved and 'projector/fc2/kernel' in saved
  assert sorted(saved) == sorted(expected)
  leaves = jax.tree.leaves({k: translator.params[k] for k in ('sign_encoder', 'projector')})
  assert len(saved) == len(leaves)
  for name, value in expected.items():
    assert saved[name].dtype == value.dtype and np.array_equal(saved[name], value), name

  _, encoder_params = hf_api.load_hf(os.path.join(out, artifacts.ENCODER_DIR))
  assert_trees_equal(encoder_params, jax.device_get(translator.encoder.params))
  with open(os.path.join(out, export_lib.SIGN_CONFIG)) as f:
    config = json.load(f)
  assert (config['format'], config['version']) == (export_lib.EXPORT_FORMAT,
                                                   export_lib.EXPORT_VERSION)
  assert config['prompt']['before_ids'] == list(translator.prompt.before)
  assert config['prompt']['after_ids'] == list(translator.prompt.after)
  assert config['decoder']['hidden_size'] == translator.model.config.decoder.hidden_size
  assert config['tokenizer']['eos_id'] == translator.tokenizer.eos_id
  assert config['sign_encoder']['fusion']['d_model'] == config['projector']['input_size']
  assert os.path.exists(os.path.join(out, export_lib.README))

  with pytest.raises(FileExistsError, match='not empty; refusing to overwrite'):
    export_lib.export(translator, out)
  export_lib.export(translator, out, overwrite=True)
  assert sorted(os.listdir(out)) == sorted([
      'decoder', artifacts.ENCODER_DIR, export_lib.SIGN_WEIGHTS, export_lib.SIGN_CONFIG,
      export_lib.README])

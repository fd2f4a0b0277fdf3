"""Sharded steps on 8 fake CPU devices give the one-device numbers, with parameters really split.

For each stage (representation, SFT, GRPO update), one step runs on one device and on the meshes
(data, fsdp, tensor) = (8,1,1), (2,4,1), (2,2,2) and (1,1,8); loss and updated parameters agree
to 1e-5 relative. Models are tiny but sized so that embed, mlp, heads, kv_heads and vocab divide by
2, 4 and 8, so fsdp and tensor really cut them (the sign encoder's 2 heads do not divide by 4 or 8
and exercise the replicated fallback).
"""

import re
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from rvlf_jax import sharding
from rvlf_jax.data import pipeline
from rvlf_jax.data.synthsign import SynthSign
from rvlf_jax.data.tokenizers import PromptTemplate, SentencePieceTokenizer
from rvlf_jax.models import decoder, layers, slt
from rvlf_jax.models.layers import LoraConfig
from rvlf_jax.recipe.build import ConfigError
from rvlf_jax.rl.sampler import SamplingConfig
from rvlf_jax.train import grpo, optimizers, represent, sft
from rvlf_jax.train import params as params_lib
from rvlf_jax.train import state as state_lib
from tests import helpers

P = jax.sharding.PartitionSpec
MESHES = ((8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8))
# Compiles dominate this file's time: no LLVM optimisation (as helpers.fast_jit), and XLA CPU's
# older fusion emitters, which compile these programs about 3x faster (same results).
FAST = {'compiler_options': {'xla_backend_optimization_level': 0,
                             'xla_cpu_use_fusion_emitters': False}}
VOCAB = 128  # decoders' vocabulary: the tokenizer's 96 pieces, padded to divide by 8
BATCH = 8


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  assert len(jax.devices()) == 8, 'tests/conftest.py sets up 8 fake CPU devices'
  ds = SynthSign('tiny', seed=0)
  tokenizer = SentencePieceTokenizer.train(ds.text_corpus('train'), vocab_size=96,
                                           path=str(tmp_path_factory.mktemp('spm') / 'spm.model'))
  assert tokenizer.vocab_size <= VOCAB
  featurize = pipeline.Featurizer(tokenizer=tokenizer,
                                  buckets=pipeline.Buckets(frames=(64,), tokens=(16,)))
  batch = next(iter(pipeline.eval_pipeline(pipeline.SplitSource(ds, 'train'), featurize, BATCH,
                                           shard=(0, 1))))
  batch = jax.tree.map(np.asarray, pipeline.device_batch(batch))
  ids = PromptTemplate().prompt(tokenizer, 'English')
  prompt = slt.Prompt(np.asarray(ids.before, np.int32), np.asarray(ids.after, np.int32))
  return tokenizer, batch, prompt


def tiny_decoder(**changes):
  """GQA decoder whose hidden 64, mlp 128, 16 heads, 8 kv heads and vocab 128 divide by 8."""
  return decoder.DecoderConfig.tiny('qwen3', **{
      **dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_heads=16,
             num_kv_heads=8, head_dim=8, num_layers=1), **changes})


def random_params(model, boxed):
  """Random values for every parameter (LoRA's B too, so that adapters have gradients)."""
  rng = np.random.RandomState(0)
  return jax.tree.map(lambda x: np.asarray(0.1 * rng.randn(*x.value.shape), np.float32), boxed,
                      is_leaf=lambda x: isinstance(x, nn.Partitioned))


def optimizer():
  """The stages' AdamW. eps 1e-3 makes the first update a smooth function of the gradient: with
  1e-8 it is lr * sign(g), and float noise flips the sign of gradients that cancel to ~0."""
  return optimizers.make_optimizer(optimizers.OptimizerConfig(
      learning_rate=1e-2, warmup_steps=0, total_steps=10, eps=1e-3))


class Stage:
  """One stage's step, its initial state (numpy) and batch, and its one-device result."""

  def __init__(self, step, state, batch, boxed):
    self.step, self.state, self.batch, self.boxed = step, state, batch, boxed
    self.rng = jax.random.key(7)  # threefry: the same random numbers however it is sharded
    new_state, metrics = jax.jit(step, **FAST)(self.fresh_state(), batch, self.rng)
    self.loss = float(metrics['loss'])
    self.params = jax.tree.map(np.asarray, new_state.params)

  def fresh_state(self):
    return jax.tree.map(jnp.array, self.state)  # new buffers: steps donate theirs


def represent_stage(data):
  tokenizer, batch, _ = data
  config = slt.AlignerConfig.tiny(vocab_size=VOCAB,
                                  sign=slt.SignEncoderConfig.tiny(skeleton_only=True))
  model = slt.SignTextAligner(config)
  boxed = model.abstract_params(boxed=True)
  tx = optimizer()
  state = state_lib.create(random_params(model, boxed), tx)
  return Stage(represent.make_step(model, tx), jax.tree.map(np.asarray, state), batch, boxed)


def sft_stage(data):
  """Full fine-tuning: every decoder kernel and its Adam moments are trained and sharded (the
  sign encoder is frozen here: the representation stage trains it)."""
  _, batch, prompt = data
  model = slt.SLTModel(slt.SLTConfig(slt.SignEncoderConfig.tiny(skeleton_only=True),
                                     tiny_decoder(), None))
  boxed = model.abstract_params(boxed=True)
  params = random_params(model, boxed)
  tx = optimizer()
  trained, frozen = params_lib.partition(params, sft.trained_mask(params, lora=False,
                                                                  train_sign_encoder=False))
  state = state_lib.create(trained, tx, frozen=frozen)
  return Stage(sft.make_step(model, tx, prompt), jax.tree.map(np.asarray, state), batch, boxed)


def grpo_stage(data):
  """The GRPO update (each of the `mu` policy iterations) on 8 completions (the B x G rows of
  GRPOTrainer.step), from the same pure functions GRPOTrainer jits or shards."""
  tokenizer, batch, prompt = data
  model = slt.SLTModel(slt.SLTConfig(slt.SignEncoderConfig.tiny(skeleton_only=True),
                                     tiny_decoder(), LoraConfig(rank=4)))
  boxed = model.abstract_params(boxed=True)
  params = random_params(model, boxed)
  tx = optimizer()
  config = grpo.GRPOConfig(group_size=4, sampling=SamplingConfig(temperature=1.0,
                                                                 max_new_tokens=8), beta=0.04)
  prefix = jax.jit(grpo.make_prefix(model, prompt))
  reference = jax.jit(grpo.make_reference(model, config))
  update = grpo.make_update(model, tx, config)
  trained, frozen = params_lib.partition(params, grpo.trained_mask(params))
  # Inputs of the update as GRPOTrainer.step builds them: prompt prefixes, completions, masks,
  # advantages, the sampling policy's and the reference's log-probabilities.
  embeds, valid = prefix(params, batch)
  rng = np.random.RandomState(1)
  n, length = embeds.shape[0], 8
  tokens = rng.randint(3, tokenizer.vocab_size, (n, length)).astype(np.int32)
  mask = np.arange(length)[None] < rng.randint(2, length + 1, (n, 1))
  adv = rng.randn(n).astype(np.float32)
  prompts = dict(embeds=embeds, valid=valid)
  ref_logp = reference(frozen, prompts, tokens, mask)
  old_logp = np.asarray(ref_logp) + 0.1 * rng.randn(n, length).astype(np.float32)
  inputs = jax.tree.map(np.asarray, (prompts, tokens, mask, adv, old_logp, ref_logp))
  step = lambda state, batch, rng: update(state, *batch)
  state = state_lib.create(trained, tx, frozen=frozen)
  return Stage(step, jax.tree.map(np.asarray, state), inputs, boxed)


STAGES = {'represent': represent_stage, 'sft': sft_stage, 'grpo_update': grpo_stage}


@pytest.fixture(scope='module')
def stages():
  return {}


@pytest.fixture
def stage(request, stages, data):
  """The stage named by the test's parameter, built (and run on one device) once."""
  name = request.param
  if name not in stages:
    stages[name] = STAGES[name](data)
  return stages[name]


def close(got, want, name=''):
  """Equal to 1e-5 relative to the array's scale: an element near zero gets the same absolute
  tolerance as the array's largest (an Adam update moves every element by about the learning
  rate, so float noise in the gradient shows in absolute, not relative, terms)."""
  want = np.asarray(want)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5,
                             atol=1e-5 * float(np.abs(want).max(initial=0.0)), err_msg=name)


def split_leaves(tree):
  return [x for x in jax.tree.leaves(tree) if not x.sharding.is_fully_replicated]


# represent on (2, 2, 2) also guards skeleton.TemporalConv's kernel axes (None, 'mlp'): with its
# input dim on 'fsdp', XLA (jax 0.10.2, CPU) computes wrong input gradients through the stacked
# strided convs when all three mesh axes exceed 1 (forward and loss stay right).
CASES = [pytest.param(stage, mesh, id=f'{stage}-{"x".join(map(str, mesh))}')
         for stage in STAGES for mesh in MESHES]


@pytest.mark.parametrize('stage, mesh_shape', CASES, indirect=['stage'])
def test_sharded_step_matches_one_device(stage, mesh_shape):
  mesh = sharding.mesh_from_config(mesh_shape)
  state_sh = sharding.state_shardings(stage.state, stage.boxed, mesh)
  batch_sh = sharding.batch_sharding(mesh)
  state = jax.device_put(stage.fresh_state(), state_sh)
  batch = sharding.global_batch(stage.batch, batch_sh)
  step = sharding.shard_step(stage.step, state_sh, batch_sh, mesh, **FAST)
  new_state, metrics = step(state, batch, stage.rng)

  np.testing.assert_allclose(float(metrics['loss']), stage.loss, rtol=1e-5)
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(new_state.params),
                               jax.tree.leaves(stage.params)):
    close(got, want, jax.tree_util.keystr(path))
  # The sharding is the planned one, read back from the arrays, not assumed.
  assert jax.tree.map(lambda x: x.sharding, new_state) == state_sh
  assert all(x.sharding.mesh == mesh for x in jax.tree.leaves(new_state))
  for leaf in jax.tree.leaves(batch):
    assert leaf.sharding.spec[0] == ('data', 'fsdp')
    assert len(leaf.addressable_shards) == 8
  data_ways, fsdp, tensor = mesh_shape
  split = split_leaves(new_state)
  if fsdp == tensor == 1:
    assert not split  # pure data parallelism: parameters replicated
    return
  used = {a for x in split for dim in x.sharding.spec if dim
          for a in ((dim,) if isinstance(dim, str) else dim) if mesh.shape[a] > 1}
  assert used == {a for a, n in (('fsdp', fsdp), ('tensor', tensor)) if n > 1}, used
  # Trained parameters and their Adam moments are split alike; shards really are smaller.
  trained = split_leaves(new_state.params)
  assert trained and len(split_leaves(new_state.opt_state)) >= 2 * len(trained)
  for x in trained:
    assert x.addressable_shards[0].data.size < x.size


def test_init_sharded_gives_the_one_device_parameters_split():
  model = decoder.Decoder(tiny_decoder(), LoraConfig(rank=4))
  init = lambda: model.init(jax.random.key(0), np.zeros((1, 4), np.int32))['params']
  mesh = sharding.mesh_from_config((2, 2, 2))
  params = sharding.init_sharded(init, mesh, **FAST)
  expected = sharding.param_shardings(jax.eval_shape(init), mesh)
  assert jax.tree.map(lambda x: x.sharding, params) == expected
  layer = params['transformer']['layers']  # scanned: leading L axis
  assert layer['attn']['q_proj']['kernel'].sharding.spec == P(None, 'fsdp', 'tensor', None)
  assert layer['attn']['q_proj']['lora_b'].sharding.spec == P(None, None, 'tensor', None)
  assert layer['mlp']['down_proj']['kernel'].sharding.spec == P(None, 'tensor', 'fsdp')
  assert params['embedder']['embedding'].sharding.spec == P('tensor', 'fsdp')
  assert params['final_norm']['scale'].sharding.is_fully_replicated
  reference = jax.jit(lambda: nn.meta.unbox(init()), **FAST)()
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(reference)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_shard_step_applies_the_models_activation_constraints():
  mlp = layers.GatedMLP(64, 128)  # constrains its hidden [B, T, F] to ('batch', 'length', 'mlp')
  x = np.zeros((8, 4, 64), np.float32)
  boxed = jax.eval_shape(lambda: mlp.init(jax.random.key(0), x))['params']
  params = nn.meta.unbox(boxed)
  step = lambda p, batch, rng: (p, {'loss': mlp.apply({'params': p}, batch['x']).sum()})
  mesh = sharding.mesh_from_config((2, 1, 4))
  sharded = sharding.shard_step(step, sharding.param_shardings(boxed, mesh),
                                sharding.batch_sharding(mesh), mesh)
  args = (params, {'x': jax.ShapeDtypeStruct(x.shape, x.dtype)}, jax.random.key(0))
  text = sharded.lower(*args).as_text()
  assert re.search(r'sharding_constraint .*\[\{"data", "fsdp"\}, \{\}, \{"tensor"\}\]', text)
  assert 'sharding_constraint' not in jax.jit(step).lower(*args).as_text()  # no rules, no mesh


def test_rules_cover_every_logical_name_the_models_use():
  names = set()
  boxed = [slt.SLTModel(slt.SLTConfig.tiny('gemma3', LoraConfig(rank=2))).abstract_params(
      boxed=True), slt.SignTextAligner(slt.AlignerConfig.tiny()).abstract_params(boxed=True)]
  for tree in boxed:
    helpers.assert_all_named(tree)
    for leaf in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nn.Partitioned)):
      names.update(leaf.names)
  models = Path(sharding.__file__).parent / 'models'
  for path in models.glob('*.py'):
    text = path.read_text()
    for group in re.findall(r'with_logical_(?:constraint|partitioning)\([^()]*\(([^()]*)\)',
                            text):
      names.update(re.findall(r"'(\w+)'", group))
  names.discard(None)
  assert {'batch', 'length', 'embed', 'mlp', 'heads', 'kv_heads', 'vocab', 'layers'} <= names
  assert names <= {name for name, _ in sharding.RULES}, names - {n for n, _ in sharding.RULES}


def test_a_dimension_that_does_not_divide_is_replicated():
  mesh = sharding.mesh_from_config((1, 2, 4))
  assert sharding.logical_sharding(('embed', 'heads', 'head_dim'), (32, 8, 16), mesh).spec == P(
      'fsdp', 'tensor', None)
  assert sharding.logical_sharding(('embed', 'heads', 'head_dim'), (32, 2, 16), mesh).spec == P(
      'fsdp', None, None)
  assert sharding.logical_sharding(('vocab', 'embed'), (96, 33), mesh).spec == P('tensor', None)
  # An activation: batch takes data and fsdp, so embed stays whole.
  assert sharding.logical_sharding(('batch', 'length', 'embed'), (8, 5, 32), mesh).spec == P(
      ('data', 'fsdp'), None, None)


def test_mesh_from_config_forms():
  sizes = {'data': 2, 'fsdp': -1, 'tensor': 2}
  for form in (sizes, (2, -1, 2), _config(sizes)):
    mesh = sharding.mesh_from_config(form)
    assert mesh.axis_names == ('data', 'fsdp', 'tensor')
    assert dict(mesh.shape) == {'data': 2, 'fsdp': 2, 'tensor': 2}
    assert set(mesh.axis_types) == {jax.sharding.AxisType.Auto}
  mesh = sharding.mesh_from_config((2, 1, -1), jax.devices()[:4])
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 1, 'tensor': 2}
  # Multi-slice layout: one process is one granule here, so the DCN part is 1 x 1 x 1.
  hybrid = sharding.mesh_from_config((2, 2, 2), dcn=(1, 1, -1), process_is_granule=True)
  assert dict(hybrid.shape) == {'data': 2, 'fsdp': 2, 'tensor': 2}


def _config(sizes):
  return ml_collections.ConfigDict({'mesh': sizes, 'other': 1})


def test_bad_meshes_and_batches_fail_naming_both_numbers():
  with pytest.raises(ConfigError, match=r'needs 3 devices but 8 are present'):
    sharding.mesh_from_config((3, 1, 1))
  with pytest.raises(ConfigError, match=r'use 3 devices, which does not divide the 8'):
    sharding.mesh_from_config((3, -1, 1))
  with pytest.raises(ConfigError, match=r'one size per axis'):
    sharding.mesh_from_config((2, 4))
  with pytest.raises(ConfigError, match=r'needs 2 devices but 1 are present'):
    sharding.mesh_from_config((2, 2, 2), dcn=(2, 1, 1), process_is_granule=True)
  with pytest.raises(ConfigError, match=r'slice_index'):
    sharding.mesh_from_config((2, 2, 2), dcn=(1, 1, 1))  # CPU devices have no slices

  mesh = sharding.mesh_from_config((2, 2, 2))
  batch_sh = sharding.batch_sharding(mesh)
  message = r'batch size 6 .* not divisible by the 4 data-parallel shards .*data x fsdp = 4'
  with pytest.raises(ValueError, match=message):
    sharding.check_batch_size(6, mesh)
  sharding.check_batch_size(12, mesh)
  with pytest.raises(ValueError, match=message):
    sharding.global_batch({'keypoints': np.zeros((6, 3))}, batch_sh)
  with pytest.raises(ValueError, match='no batch dimension'):
    sharding.global_batch({'scale': np.float32(1)}, batch_sh)
  step = sharding.shard_step(lambda s, b, r: (s, {'loss': b['x'].sum()}), {}, batch_sh, mesh)
  with pytest.raises(ValueError, match=message):
    step({}, {'x': np.zeros((6, 2))}, jax.random.key(0))
  _, metrics = step({}, {'x': np.ones((4, 2))}, jax.random.key(0))
  assert float(metrics['loss']) == 8

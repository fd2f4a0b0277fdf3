"""The few-shot recipe: pre-train on base classes, tune episodically, test on novel classes.

    pool   = run.Pool(...)                  isolated clips as arrays (`data.synthsign.isolated`)
    split  = episodes.split_classes(...)    base / validation / novel classes, disjoint signers
    params = run.pretrain(...)              text-free encoder + linear head over the base classes
    params = run.tune(...)                  N-way K-shot episodes of base classes, the DVLA-RL
                                            objective (`fewshot.train`): prototypes + REINFORCE
    scores = run.evaluate(...)              2,000 novel-class episodes: accuracy +- 95% CI and
                                            the gate each RLA layer chose

A method is a row of the DVLA-RL comparison: 'protonet' (no text), or a gate ('static' a = 0.5,
'categorical', 'beta') with the class name alone or, with '+dsc', with the dual-level semantics
(attributes and a holistic description). All methods start from the same pre-trained encoder;
the RLA blocks, the text projection and the policies are new in tuning.

Steps run under the device mesh (`rvlf_jax.sharding`): parameters sharded by their logical
axes, an episode's clips over the data axes when their count divides evenly, else replicated.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rvlf_jax import sharding
from rvlf_jax.fewshot import episodes, model as model_lib, protonet, train
from rvlf_jax.models import gates, layers

Array = jax.Array
Log = Callable[[str], None]
GATE_METHODS = ('static', 'categorical', 'beta')
METHODS = ('protonet',) + tuple(f'{g}{s}' for g in GATE_METHODS for s in ('', '+dsc'))


@dataclasses.dataclass(frozen=True)
class Pool:
  """Clips as model-ready arrays.

  Attributes:
    keypoints: float32[E, T, J, 3].
    frame_mask: bool[E, T].
    classes: int[E] class (gloss) id of each clip.
    signers: int[E] signer of each clip.
    names: the class names, indexed by class id.
  """

  keypoints: np.ndarray
  frame_mask: np.ndarray
  classes: np.ndarray
  signers: np.ndarray
  names: Sequence[str]

  def inputs(self, idx: np.ndarray) -> dict[str, np.ndarray]:
    return {'keypoints': self.keypoints[idx], 'frame_mask': self.frame_mask[idx]}


@dataclasses.dataclass(frozen=True)
class Semantics:
  """Text of every class as the encoder reads it (`fewshot.dsc`).

  Attributes:
    tokens: float32[C, M, E] text tokens of each class.
    mask: bool[C, M] valid tokens.
    class_embedding: float32[C, E] t*, the class-level text embedding of the reward.
  """

  tokens: np.ndarray
  mask: np.ndarray
  class_embedding: np.ndarray


@dataclasses.dataclass(frozen=True)
class Method:
  """One row of the comparison (module docstring)."""

  name: str

  def __post_init__(self):
    if self.name not in METHODS:
      raise ValueError(f'Unknown few-shot method {self.name!r}; choose among {METHODS}.')

  @property
  def uses_text(self) -> bool:
    return self.name != 'protonet'

  @property
  def dsc(self) -> bool:
    return self.name.endswith('+dsc')

  def gate(self, base: gates.GateConfig) -> gates.GateConfig:
    kind = self.name.removesuffix('+dsc')
    if kind == 'static':
      return dataclasses.replace(base, fixed=0.5)
    if kind in ('beta', 'categorical'):
      return dataclasses.replace(base, kind=kind, fixed=None)
    return base


def _init(module: nn.Module, inputs: dict, seed: int, mesh) -> tuple[Any, Any]:
  """(params sharded by their logical axes, the boxed abstract tree)."""
  keys = {'params': jax.random.key(seed), 'gate': jax.random.key(seed + 1)}
  init_fn = lambda: module.init(keys, inputs)['params']
  boxed = jax.eval_shape(init_fn)
  return sharding.init_sharded(init_fn, mesh), boxed


# -- Pre-training ------------------------------------------------------------------------------


class _Classifier(nn.Module):
  """The encoder (as 'encoder') and a linear head over the base classes."""

  config: model_lib.FewShotModelConfig
  num_classes: int

  @nn.compact
  def __call__(self, inputs, deterministic: bool = True):
    emb = model_lib.FewShotEncoder(self.config, name='encoder')(inputs, deterministic)
    return layers.Linear((emb.shape[-1],), (self.num_classes,), ('embed', None), use_bias=True,
                         name='head')(emb)


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
  steps: int = 1500
  batch_size: int = 64
  learning_rate: float = 2e-3
  weight_decay: float = 0.05
  warmup_steps: int = 100


def pretrain(config: model_lib.FewShotModelConfig, pool: Pool, base: np.ndarray,
             settings: PretrainConfig, *, seed: int = 0, mesh=None, log: Log = print) -> Any:
  """Trains the text-free encoder with a linear head to classify the base clips.

  Args:
    config: the encoder (its `rla_at` is ignored: pre-training reads no text).
    pool: the clips.
    base: pool indices of the base-class clips by base signers.
    settings: steps, batch size and optimiser.
    seed: initialisation and batch order.
    mesh: the device mesh (default: every device on the data axis).
    log: progress lines.

  Returns:
    The encoder's parameters (without the head).
  """
  mesh = mesh or sharding.mesh_from_config({'data': -1, 'fsdp': 1, 'tensor': 1})
  classes = np.unique(pool.classes[base])
  label_of = np.full(pool.classes.max() + 1, -1, np.int32)
  label_of[classes] = np.arange(len(classes))

  clf = _Classifier(config.replace(rla_at=()), len(classes))
  rng = np.random.default_rng(seed)
  sample = pool.inputs(base[:settings.batch_size])
  params, boxed = _init(clf, sample, seed, mesh)
  warmup = min(settings.warmup_steps, settings.steps // 2)
  schedule = optax.warmup_cosine_decay_schedule(0.0, settings.learning_rate, warmup,
                                                max(settings.steps, warmup + 1))
  tx = optax.adamw(schedule, weight_decay=settings.weight_decay)
  state = (params, tx.init(params))
  state_sh = sharding.state_shardings(state, boxed, mesh)

  def step(state, batch, key):
    params, opt_state = state

    def loss_fn(p):
      logits = clf.apply({'params': p}, batch['inputs'], False, rngs={'dropout': key})
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch['labels']).mean()
      return ce, (jnp.argmax(logits, -1) == batch['labels']).mean()

    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), {'loss': loss, 'accuracy': acc}

  clips = sharding.rows_sharding(settings.batch_size, mesh)
  jitted = sharding.shard_step(step, state_sh, {'inputs': clips, 'labels': clips}, mesh)
  start, order, pos, every = time.time(), rng.permutation(base), 0, max(settings.steps // 10, 1)
  for i in range(settings.steps):
    if pos + settings.batch_size > len(order):
      order, pos = rng.permutation(base), 0
    idx = order[pos:pos + settings.batch_size]
    pos += settings.batch_size
    state, metrics = jitted(state, {'inputs': pool.inputs(idx), 'labels': label_of[pool.classes[idx]]},
                            jax.random.key(seed * 1_000_003 + i))
    if (i + 1) % every == 0 or i == 0:
      m = jax.device_get(metrics)
      elapsed = time.time() - start
      log(f'pretrain {i + 1}/{settings.steps}: loss {m["loss"]:.3f}, accuracy '
          f'{m["accuracy"]:.3f} ({elapsed:.0f} s, ETA {elapsed / (i + 1) * (settings.steps - i - 1):.0f} s)')
  return jax.device_get(state[0]['encoder'])


# -- Episodes ----------------------------------------------------------------------------------


def episode_batch(pool: Pool, episode: episodes.Episode, semantics: Semantics | None) -> dict:
  """The batch of one episode for `fewshot.train`: clips (support, then queries), labels, and,
  with text, every clip given the text tokens of all N episode classes."""
  idx = np.concatenate([episode.support, episode.query])
  inputs = pool.inputs(idx)
  n = len(episode.classes)
  if semantics is None:
    class_text = np.zeros((n, 1), np.float32)
  else:
    _, m, e = semantics.tokens.shape
    tokens = semantics.tokens[episode.classes].reshape(n * m, e)
    mask = semantics.mask[episode.classes].reshape(n * m)
    inputs['text'] = np.broadcast_to(tokens, (len(idx), n * m, e))
    inputs['text_mask'] = np.broadcast_to(mask, (len(idx), n * m))
    class_text = semantics.class_embedding[episode.classes]
  return {'inputs': inputs, 'support_labels': episode.support_labels.astype(np.int32),
          'query_labels': episode.query_labels.astype(np.int32),
          'class_text': class_text.astype(np.float32)}


def _batch_sharding(batch: dict, mesh) -> dict:
  rep = sharding.replicated(mesh)
  clips = sharding.rows_sharding(batch['inputs']['frame_mask'].shape[0], mesh)
  return {'inputs': clips, 'support_labels': rep, 'query_labels': rep, 'class_text': rep}


@dataclasses.dataclass(frozen=True)
class TuneConfig:
  steps: int = 400
  n_way: int = 5
  k_shot: int = 5
  n_query: int = 10
  learning_rate: float = 5e-4
  policy_learning_rate: float = 5e-3
  weight_decay: float = 0.05
  objective: train.ObjectiveConfig = train.ObjectiveConfig()


def _is_policy(path) -> bool:
  return any(getattr(k, 'key', None) == 'policy' for k in path)


def tune(config: model_lib.FewShotModelConfig, pretrained: Any, pool: Pool, base: np.ndarray,
         semantics: Semantics | None, settings: TuneConfig, *, seed: int = 0, mesh=None,
         log: Log = print) -> tuple[Any, list[dict[str, float]]]:
  """Episodic tuning on base classes with the DVLA-RL objective, from pre-trained weights.

  Args:
    config: the encoder (with RLA blocks unless `semantics` is None).
    pretrained: `pretrain`'s parameters (stem and layers; loaded by name).
    pool, base: the clips and the base split's indices.
    semantics: the class texts, or None for the text-free encoder.
    settings: episodes, steps, learning rates and the objective's weights.
    seed, mesh, log: as `pretrain`.

  Returns:
    (parameters, the logged metrics).
  """
  mesh = mesh or sharding.mesh_from_config({'data': -1, 'fsdp': 1, 'tensor': 1})
  if (semantics is None) == config.uses_text:
    raise ValueError(f'rla_at={config.rla_at} needs class semantics exactly when it has RLA '
                     'blocks.')
  rng = np.random.default_rng(seed)
  module = model_lib.FewShotEncoder(config)
  draw = lambda: episodes.sample_episode(pool.classes, base, settings.n_way, settings.k_shot,
                                         settings.n_query, rng)
  batch = episode_batch(pool, draw(), semantics)
  params, boxed = _init(module, batch['inputs'], seed, mesh)
  params = {k: pretrained[k] if k in pretrained else v for k, v in params.items()}
  labels = jax.tree_util.tree_map_with_path(lambda p, _: 'policy' if _is_policy(p) else 'rest',
                                            params)
  tx = optax.multi_transform(
      {'rest': optax.adamw(settings.learning_rate, weight_decay=settings.weight_decay),
       'policy': optax.adam(settings.policy_learning_rate)}, labels)
  embed = train.module_embed(module)
  num_layers = len(config.rla_at)
  state = train.create_state(params, tx, num_layers)
  state_sh = sharding.state_shardings(state, boxed, mesh)
  jitted = sharding.shard_step(train.make_step(embed, tx, settings.objective), state_sh,
                               _batch_sharding(batch, mesh), mesh)
  history, start, every = [], time.time(), max(settings.steps // 10, 1)
  for i in range(settings.steps):
    state, metrics = jitted(state, batch, jax.random.key(seed * 1_000_003 + i))
    batch = episode_batch(pool, draw(), semantics)
    if (i + 1) % every == 0 or i == 0:
      m = {k: float(v) for k, v in jax.device_get(metrics).items()}
      history.append({'step': i + 1, **m})
      gate_text = ', '.join(f'gate {j} {m[f"gate_{j}"]:.2f}' for j in range(num_layers))
      elapsed = time.time() - start
      log(f'tune {i + 1}/{settings.steps}: loss {m["sup_loss"]:.3f}, accuracy '
          f'{m["accuracy"]:.3f}{", " + gate_text if gate_text else ""} ({elapsed:.0f} s, ETA '
          f'{elapsed / (i + 1) * (settings.steps - i - 1):.0f} s)')
  return jax.device_get(state.params), history


# -- Evaluation --------------------------------------------------------------------------------


def evaluate(config: model_lib.FewShotModelConfig, params: Any, pool: Pool, novel: np.ndarray,
             semantics: Semantics | None, *, n_way: int = 5, k_shot: int = 1,
             n_query: int = 15, num_episodes: int = 2000, seed: int = 0, mesh=None,
             metric: str = 'euclidean') -> dict[str, Any]:
  """Accuracy over `num_episodes` novel-class episodes, with its 95% interval, and the gate
  each RLA layer chose (the policies' modes), averaged over the episodes.

  Returns:
    {'accuracy', 'ci95', 'episodes', 'gates': [mean gate per RLA layer], 'seconds'}.
  """
  mesh = mesh or sharding.mesh_from_config({'data': -1, 'fsdp': 1, 'tensor': 1})
  embed = train.module_embed(model_lib.FewShotEncoder(config))

  def episode_fn(params, batch):
    s = batch['support_labels'].shape[0]
    emb, records = embed(params, batch['inputs'], None)
    protos = protonet.prototypes(emb[:s], batch['support_labels'], n_way)
    acc = protonet.accuracy(protonet.logits(emb[s:], protos, metric), batch['query_labels'])
    return acc, jnp.stack([r['gate'].mean() for r in records]) if records else jnp.zeros((0,))

  jitted = jax.jit(episode_fn)
  gate_sums = []

  def accuracy(episode):
    with sharding.mesh_context(mesh):
      acc, gate = jitted(params, episode_batch(pool, episode, semantics))
    gate_sums.append(gate)
    return acc

  start = time.time()
  scores = episodes.evaluate(accuracy, pool.classes, novel, n_way=n_way, k_shot=k_shot,
                             n_query=n_query, num_episodes=num_episodes,
                             rng=np.random.default_rng(seed))
  gates_l = np.mean(np.asarray(jax.device_get(gate_sums)), axis=0) if gate_sums else []
  return {**scores, 'gates': [float(g) for g in gates_l], 'seconds': time.time() - start}

"""The few-shot recipe's pieces on a small random pool: episode batches, pre-training, tuning
with the RL gates, evaluation; the config variants and the results table."""

import numpy as np
import pytest

from configs import fewshot_synthsign
from rvlf_jax.fewshot import episodes, experiment, model as model_lib, run
from rvlf_jax.models import gates
from rvlf_jax.models.skeleton import SkeletonConfig

C, S, T, E = 8, 4, 8, 6


def _pool():
  rng = np.random.default_rng(0)
  classes, signers = np.repeat(np.arange(C), 2 * S), np.tile(np.repeat(np.arange(S), 2), C)
  kp = rng.standard_normal((len(classes), T, 133, 3)).astype(np.float32)
  kp[..., :2] += classes[:, None, None, None] * 0.3  # classes are separable
  return run.Pool(kp, np.ones((len(classes), T), bool), classes, signers,
                  [f'SIGN{i}' for i in range(C)])


def _semantics():
  rng = np.random.default_rng(1)
  return run.Semantics(rng.standard_normal((C, 2, E)).astype(np.float32), np.ones((C, 2), bool),
                       rng.standard_normal((C, E)).astype(np.float32))


def test_episode_batch_gives_every_clip_the_text_of_all_episode_classes():
  pool, sem = _pool(), _semantics()
  ep = episodes.sample_episode(pool.classes, np.arange(len(pool.classes)), 3, 2, 1,
                               np.random.default_rng(0))
  batch = run.episode_batch(pool, ep, sem)
  assert batch['inputs']['keypoints'].shape == (9, T, 133, 3)
  text = batch['inputs']['text']
  assert text.shape == (9, 6, E)
  np.testing.assert_array_equal(text[0], np.concatenate(sem.tokens[ep.classes]))
  assert all(np.array_equal(text[0], t) for t in text)  # no clip gets its own label's text
  np.testing.assert_array_equal(batch['class_text'], sem.class_embedding[ep.classes])
  assert 'text' not in run.episode_batch(pool, ep, None)['inputs']


def test_methods():
  assert run.METHODS == ('protonet', 'static', 'static+dsc', 'categorical', 'categorical+dsc',
                         'beta', 'beta+dsc')
  base = gates.GateConfig()
  assert run.Method('static+dsc').gate(base).fixed == 0.5 and run.Method('static+dsc').dsc
  assert run.Method('categorical').gate(base).kind == 'categorical'
  assert not run.Method('protonet').uses_text
  with pytest.raises(ValueError, match='Unknown few-shot method'):
    run.Method('maml')


def test_pretrain_tune_evaluate_with_beta_gates():
  pool, sem = _pool(), _semantics()
  split = episodes.split_classes(pool.classes, pool.signers, num_val_classes=1,
                                 num_novel_classes=3, num_novel_signers=2,
                                 rng=np.random.default_rng(0))
  sk = SkeletonConfig.tiny(part_dim=4, d_model=8, num_heads=2, mlp_dim=16)
  config = model_lib.FewShotModelConfig(skeleton=sk, num_layers=1, rla_at=(0,), text_dim=E)
  lines = []
  pre = run.pretrain(config, pool, split.base, run.PretrainConfig(steps=4, batch_size=8),
                     log=lines.append)
  assert 'stem' in pre and 'head' not in pre and lines[-1].startswith('pretrain 4/4')
  settings = run.TuneConfig(steps=3, n_way=3, k_shot=1, n_query=1)
  start, _ = run.tune(config, pre, pool, split.base, sem, run.TuneConfig(steps=0, n_way=3,
                      k_shot=1, n_query=1))
  np.testing.assert_array_equal(start['layers_0']['attn']['q_proj']['kernel'],
                                pre['layers_0']['attn']['q_proj']['kernel'])  # tuning starts
  assert 'rla_0' in start and 'rla_0' not in pre                        # from pre-training
  params, history = run.tune(config, pre, pool, split.base, sem, settings, log=lines.append)
  policy = lambda p: p['rla_0']['policy']['out']['kernel']
  assert not np.allclose(policy(params), policy(start))  # REINFORCE moved the policy
  assert {'gate_0', 'entropy_0', 'rl_loss', 'accuracy'} <= set(history[-1])
  assert 0.0 <= history[-1]['gate_0'] <= 1.0
  scores = run.evaluate(config, params, pool, split.novel, sem, n_way=3, k_shot=1, n_query=1,
                        num_episodes=4)
  assert scores['episodes'] == 4 and 0.0 <= scores['accuracy'] <= 1.0
  assert len(scores['gates']) == 1 and 0.0 < scores['gates'][0] < 1.0
  with pytest.raises(ValueError, match='needs class semantics'):
    run.tune(config, pre, pool, split.base, None, settings)


@pytest.mark.parametrize('arg', [None, 'table', 'tiny', 'tiny,table'])
def test_config_variants_build(arg):
  c = fewshot_synthsign.get_config(arg)
  for m in c.methods:
    run.Method(m)
  cfg = experiment.model_config(c, 77, 16)
  assert cfg.rla_at == tuple(c.model.rla_at) and cfg.skeleton.num_joints == 77
  with pytest.raises(ValueError, match='unknown variant'):
    fewshot_synthsign.get_config('maml')


def test_results_table():
  row = lambda a, g: {'accuracy': a, 'ci95': 0.01, 'gates': g}
  results = {'methods': {'protonet': {'1shot': row(0.5, []), '5shot': row(0.7, [])},
                         'beta+dsc': {'1shot': row(0.6, [0.3]), '5shot': row(0.8, [0.25, 0.9])}}}
  table = experiment._table(results, (1, 5))
  assert '| protonet | 50.00 +- 1.00 | 70.00 +- 1.00 | - |' in table
  assert '| beta+dsc | 60.00 +- 1.00 | 80.00 +- 1.00 | 0.25, 0.90 |' in table

"""The logic of benchmarks.bench_grpo: the task, the reward on every side, the compute floor, and
our and TRL's runners for two steps on a tiny model. (Tunix lives in its own virtual environment,
which the benchmark makes on first use; its runner is exercised by the benchmark, not here.)"""

import numpy as np
import pytest

from benchmarks import bench_grpo, common
from rvlf_jax.rl import rewards

# A tiny Llama in model M's format; the vocabulary is large enough for the prompts' random ids.
TINY = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


@pytest.fixture(scope='module')
def tiny():
  return (common.model_m_dir(**TINY), bench_grpo.tokenizer_dir(TINY['vocab_size']),
          bench_grpo.make_task(TINY['vocab_size']))


def test_floor_of_model_m_is_the_issues():
  floor = bench_grpo.grpo_step_flops(common.MODEL_M)
  assert floor['total'] == pytest.approx(1.6e12, rel=0.05)  # "about 1.6 TFLOP"
  assert floor['reference'] == pytest.approx(floor['policy'] / 3)
  # Sampling: B x P prefill tokens and B x G x N decoded ones at 2 N_params FLOPs each, plus
  # attention (a few percent here).
  n = common.non_embedding_params(common.MODEL_M)
  tokens = 8 * 32 + 64 * 64
  assert 2 * n * tokens < floor['sampling'] < 1.05 * 2 * n * tokens


def test_every_side_sees_the_same_prompts_and_rewards(tiny):
  import transformers
  _, tok_dir, task = tiny
  tokenizer = transformers.AutoTokenizer.from_pretrained(tok_dir)
  assert task.prompt_ids.shape == (8, 32) and task.prompt_ids.min() > bench_grpo.UNK
  for ids, text in zip(task.prompt_ids, task.prompt_texts):
    assert tokenizer(text, add_special_tokens=False)['input_ids'] == ids.tolist()
  bench_grpo._check_reward_views(tok_dir, TINY['vocab_size'])
  # The peers' reward (sacrebleu on the reward words) is ours, value for value.
  rng = np.random.default_rng(1)
  ids = rng.integers(0, TINY['vocab_size'], (16, 40))
  ids[3, 5] = bench_grpo.EOS
  texts = [tokenizer.decode(r[:list(r).index(1)] if 1 in r else r, skip_special_tokens=True)
           for r in ids.tolist()]
  refs = [task.references[i % 8] for i in range(16)]
  theirs = bench_grpo.sentence_bleu(texts, refs)
  ours = rewards.compute({'bleu': 1.0}, bench_grpo.RewardWords().decode_batch(ids), refs)['bleu']
  np.testing.assert_array_equal(ours, theirs)
  assert max(theirs) > 0


def test_ours_two_steps(tiny):
  path, _, task = tiny
  out = bench_grpo.run_ours(path, task, 2)
  assert len(out['times']) == len(out['rewards']) == 2
  assert all(0 <= r <= 1 for r in out['rewards']) and max(out['rewards']) > 0
  assert all(1 <= n <= bench_grpo.NEW_TOKENS for n in out['lengths'])


def test_trl_two_steps(tiny):
  path, tok_dir, task = tiny
  out = bench_grpo.run_trl(path, tok_dir, task, 2)
  assert len(out['times']) == len(out['rewards']) == 2
  assert all(0 <= r <= 1 for r in out['rewards'])
  assert all(1 <= n <= bench_grpo.NEW_TOKENS for n in out['lengths'])


def test_peer_limits_name_the_cap_each_peer_sets():
  # Floor 10 s, ours 13 s: TRL at 17 s (1.7x its floor) caps the speed-up at 1.7x < 1.6 x 1.3.
  text = bench_grpo.peer_limits(10.0, 13.0, {'TRL': 17.0, 'Tunix': 40.0})
  assert 'TRL ran at 1.70x the floor' in text and 'needs ours at 1.06x the floor' in text
  assert 'Tunix ran' not in text  # 40 / 13 = 3.1x: its goal is met
  assert bench_grpo.peer_limits(10.0, 13.0, {'TRL': 30.0, 'Tunix': 40.0}) is None

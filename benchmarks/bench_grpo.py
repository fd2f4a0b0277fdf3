"""GRPO step on model M: ours (`rvlf_jax.train.grpo_text`) vs TRL's GRPOTrainer vs Tunix's
GRPOLearner (issue item 3).

    python -m benchmarks.bench_grpo [--quick]

The task, the same on every side, float32, the weights of model M (`common.model_m_dir()`):
  - 8 prompts of 32 token ids each (random ids, seed 0), G = 8 completions per prompt, at most
    64 completion tokens (sampling at temperature 1, no top-k / top-p; eos ends a completion);
  - reward: sentence BLEU (sacrebleu's, `rvlf_jax.rl.rewards` on our side, which equals it bit for
    bit) of the completion against its prompt ("repeat the prompt"), where each token reads as
    one of 16 words (id mod 16), so that a random-init policy earns varied, non-zero rewards and
    the group advantages carry signal; a word-level HF tokenizer (id i <-> text 't{i}') serves
    TRL and Tunix, and the reward maps their detokenized text to the same words;
  - advantages (r - group mean) / (group std + eps), clipped GRPO loss (epsilon 0.2, mu = 1),
    k3 KL to a frozen reference (beta 0.04), per-sequence token mean then mean over sequences;
  - full-parameter AdamW (lr 1e-4, betas 0.9/0.999, eps 1e-8, no weight decay, constant
    schedule), gradients clipped to global norm 1 (TRL's default, set on the others).
TRL runs its GRPOTrainer with gradient checkpointing off and bf16 off (torch CPU, float32);
Tunix runs its own Llama-3 model class (`tunix.models.llama3`) loading the same safetensors, in
a separate virtual environment (google-tunix pins safetensors<0.8, which ours does not use), as
a subprocess of this module (`--tunix-worker`).

Seconds per step: median of the timed steps after the warm-up ones. Ours times `step()` (it
returns host metrics, so it has finished); TRL from its step-begin to step-end callbacks; Tunix
from one reward call to the next (each step calls the reward once, between its sampling and its
update, so the interval is one whole step). The compute floor of a step is policy
forward + backward over the B x G prompt + completion sequences, a reference forward over them,
and sampling with each prompt prefilled once per group, at the matmul peak measured in this run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

from benchmarks import common

PROMPTS, GROUP, PROMPT_LEN, NEW_TOKENS = 8, 8, 32, 64
WORDS = 16  # token id i reads as word 'w{i % WORDS}' in the reward
LEARNING_RATE = 1e-4
BETA = 0.04
EPSILON = 0.2
MAX_GRAD_NORM = 1.0
PAD, EOS, UNK = 0, 1, 2  # ids of the word-level tokenizer's special tokens
TUNIX_VERSION = '0.1.7'
TUNIX_VENV = os.environ.get('RVLF_TUNIX_VENV', os.path.join(common.CACHE_DIR, 'tunix-venv'))
PLOT = 'grpo_rewards.png'
GOAL_FLOOR, GOAL_TRL, GOAL_TUNIX = 1.3, 1.6, 2.4


# -- The task ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Task:
  """What every side trains on: prompts, their texts and references."""

  prompt_ids: np.ndarray  # int32[B, P]
  prompt_texts: list[str]  # the ids as the word-level tokenizer's text
  references: list[str]  # the prompts as reward words


def make_task(vocab_size: int, prompts: int = PROMPTS, prompt_len: int = PROMPT_LEN,
              seed: int = 0) -> Task:
  ids = np.random.default_rng(seed).integers(UNK + 1, vocab_size, (prompts, prompt_len))
  ids = ids.astype(np.int32)
  return Task(ids, [' '.join(f't{i}' for i in row) for row in ids.tolist()],
              [' '.join(f'w{i % WORDS}' for i in row) for row in ids.tolist()])


def reward_words(text: str) -> str:
  """The reward's view of a detokenized completion: 't123 t45' -> 'w11 w13'."""
  return ' '.join(f'w{int(t[1:]) % WORDS}' for t in text.split() if t[1:].isdigit())


def sentence_bleu(completions: list[str], references: list[str]) -> list[float]:
  """The peers' reward: sacrebleu sentence BLEU / 100 of each completion's words."""
  import sacrebleu
  return [sacrebleu.sentence_bleu(reward_words(c), [r]).score / 100
          for c, r in zip(completions, references)]


class RewardWords:
  """Our trainer's tokenizer view: ids -> reward words, ending at eos, special ids dropped.

  The same text as `reward_words(hf_tokenizer.decode(ids, skip_special_tokens=True))` (checked
  by `run`), without the round trip through 't{i}' strings.
  """

  eos_id, pad_id = EOS, PAD

  def decode_batch(self, ids: np.ndarray) -> list[str]:
    texts = []
    for row in np.asarray(ids).tolist():
      row = row[:row.index(EOS)] if EOS in row else row
      texts.append(' '.join(f'w{i % WORDS}' for i in row if i > UNK))
    return texts


def tokenizer_dir(vocab_size: int) -> str:
  """A word-level HF tokenizer, id i <-> 't{i}' (0 pad, 1 eos, 2 unk), saved once."""
  path = os.path.join(common.CACHE_DIR, f'wordlevel-tokenizer-{vocab_size}')
  if os.path.exists(os.path.join(path, 'tokenizer.json')):
    return path
  import tokenizers
  import transformers
  vocab = {'<pad>': PAD, '</s>': EOS, '<unk>': UNK}
  vocab.update({f't{i}': i for i in range(UNK + 1, vocab_size)})
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token='<unk>'))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token='<pad>', eos_token='</s>', unk_token='<unk>',
      clean_up_tokenization_spaces=False)
  tmp = path + f'.tmp{os.getpid()}'
  fast.save_pretrained(tmp)
  os.replace(tmp, path)
  return path


def grpo_step_flops(config: dict[str, Any], prompts: int = PROMPTS, group: int = GROUP,
                    prompt_len: int = PROMPT_LEN, new_tokens: int = NEW_TOKENS) -> dict[str, float]:
  """The compute floor of one GRPO step, by part (FLOPs as in `common.train_step_flops`).

  policy: forward + backward over the B x G sequences of P + N tokens; reference: their forward;
  sampling: each prompt prefilled once (B x P tokens), then B x G sequences decode N tokens,
  token i attending to P + i + 1 keys.
  """
  policy = common.train_step_flops(config, prompts * group, prompt_len + new_tokens)
  n_params = common.non_embedding_params(config)
  layers, d = config['num_hidden_layers'], config['hidden_size']
  prefill = common.train_step_flops(config, prompts, prompt_len) / 3
  decode = sum(prompts * group * (2 * n_params + 4 * layers * d * (prompt_len + i + 1))
               for i in range(new_tokens))
  parts = {'policy': policy, 'reference': policy / 3, 'sampling': prefill + decode}
  parts['total'] = sum(parts.values())
  return parts


def shared_prefix_flops(config: dict[str, Any], prompts: int = PROMPTS, group: int = GROUP,
                        prompt_len: int = PROMPT_LEN,
                        new_tokens: int = NEW_TOKENS) -> dict[str, float]:
  """What our step computes: as `grpo_step_flops`, but teacher forcing runs each prompt once
  per group (B x P + B x G x (N - 1) tokens instead of B x G x (P + N); attention still counted
  over all P + N keys)."""
  n_params = common.non_embedding_params(config)
  layers, d = config['num_hidden_layers'], config['hidden_size']
  tokens = prompts * prompt_len + prompts * group * (new_tokens - 1)
  forward = 2 * n_params * tokens + 4 * layers * d * (prompt_len + new_tokens) * tokens
  parts = {'policy': 3 * forward, 'reference': forward,
           'sampling': grpo_step_flops(config, prompts, group, prompt_len, new_tokens)['sampling']}
  parts['total'] = sum(parts.values())
  return parts


def step_stats(times: list[float], warmup: int) -> common.Timing:
  timed = times[warmup:]
  return common.Timing(statistics.median(timed), min(timed), max(timed), len(timed))


# -- Ours ------------------------------------------------------------------------------------------


def run_ours(model_dir: str, task: Task, steps: int, *, share_prefix: bool = True,
             cost_analysis: bool = False, **overrides) -> dict[str, Any]:
  """Our text GRPO trainer for `steps` steps: per-step seconds, rewards and piece timings.

  `overrides` are DecoderConfig fields for `load_hf` (scan_layers, remat, ...).
  """
  import jax
  import optax
  from rvlf_jax.hf import api
  from rvlf_jax.models import decoder as dec
  from rvlf_jax.rl.sampler import SamplingConfig
  from rvlf_jax.train import grpo_text

  config, params = api.load_hf(model_dir, **overrides)
  model = dec.Decoder(config)
  tx = optax.chain(optax.clip_by_global_norm(MAX_GRAD_NORM),
                   optax.adamw(LEARNING_RATE, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0))
  grpo_config = grpo_text.TextGRPOConfig(
      group_size=GROUP, sampling=SamplingConfig(temperature=1.0, max_new_tokens=NEW_TOKENS),
      rewards=(('bleu', 1.0),), beta=BETA, epsilon=EPSILON, share_prefix=share_prefix)
  trainer = grpo_text.TextGRPOTrainer(model, tx, RewardWords(), grpo_config)
  state = trainer.init_state(jax.device_put(params))
  batch = {'prompt': task.prompt_ids, 'reference': task.references}
  out: dict[str, list] = {'times': [], 'rewards': [], 'lengths': [], 'sampling': [],
                          'reward_time': [], 'update': []}
  for i in range(steps):
    start = time.perf_counter()
    state, metrics = trainer.step(state, batch, jax.random.key(i))
    out['times'].append(time.perf_counter() - start)
    out['rewards'].append(metrics['reward_total_mean'])
    out['lengths'].append(metrics['completion_length_mean'])
    out['sampling'].append(metrics['time_sampling'])
    out['reward_time'].append(metrics['time_reward'])
    out['update'].append(metrics['time_update'])
  if cost_analysis:
    out['xla_flops'] = _xla_flops(trainer, state, task)
  return out


def _xla_flops(trainer, state, task: Task) -> dict[str, float]:
  """XLA's own FLOP count of our compiled pieces (cost analysis of the programs that ran)."""
  import jax
  import jax.numpy as jnp
  prompt = jnp.asarray(task.prompt_ids)
  valid = jnp.ones(prompt.shape, bool)
  b, g, n = prompt.shape[0], GROUP, NEW_TOKENS
  tokens = jax.ShapeDtypeStruct((b, g, n), jnp.int32)
  mask = jax.ShapeDtypeStruct((b, g, n), bool)
  logp = jax.ShapeDtypeStruct((b, g, n), jnp.float32)
  adv = jax.ShapeDtypeStruct((b, g), jnp.float32)
  flops = lambda compiled: float(compiled.cost_analysis().get('flops', float('nan')))
  return {
      'update': flops(trainer._update.lower(state, prompt, valid, tokens, mask, adv, None,
                                            logp).compile()),
      'reference': flops(trainer._reference.lower(state.frozen, prompt, valid, tokens).compile()),
  }


# -- TRL -------------------------------------------------------------------------------------------


def run_trl(model_dir: str, tok_dir: str, task: Task, steps: int) -> dict[str, Any]:
  """TRL's GRPOTrainer on the same task: per-step seconds (callbacks) and rewards."""
  import datasets
  import torch
  import transformers
  import trl

  torch.manual_seed(0)
  tokenizer = transformers.AutoTokenizer.from_pretrained(tok_dir)
  dataset = datasets.Dataset.from_dict({'prompt': task.prompt_texts,
                                        'reference': task.references})
  out: dict[str, list] = {'times': [], 'rewards': [], 'lengths': []}

  def bleu(prompts, completions, reference, completion_ids=None, **kwargs):
    del prompts, kwargs
    scores = sentence_bleu(completions, reference)
    out['rewards'].append(float(np.mean(scores)))
    if completion_ids is not None:
      out['lengths'].append(float(np.mean([len(c) for c in completion_ids])))
    return scores

  class StepTimer(transformers.TrainerCallback):

    def on_step_begin(self, args, state, control, **kwargs):
      self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
      out['times'].append(time.perf_counter() - self.start)

  workdir = tempfile.mkdtemp(prefix='trl-grpo-')
  try:
    args = trl.GRPOConfig(
        output_dir=workdir, per_device_train_batch_size=PROMPTS * GROUP,
        gradient_accumulation_steps=1, num_generations=GROUP,
        max_completion_length=NEW_TOKENS, temperature=1.0, top_p=1.0, top_k=0,
        beta=BETA, epsilon=EPSILON, loss_type='grpo', scale_rewards='group', num_iterations=1,
        learning_rate=LEARNING_RATE, lr_scheduler_type='constant', warmup_steps=0,
        weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        max_grad_norm=MAX_GRAD_NORM, optim='adamw_torch', bf16=False, fp16=False,
        gradient_checkpointing=False, use_cpu=True, report_to='none', logging_steps=1,
        save_strategy='no', max_steps=steps, shuffle_dataset=False, seed=0,
        dataloader_num_workers=0, disable_tqdm=True, model_init_kwargs={'dtype': 'float32'})
    trainer = trl.GRPOTrainer(model=model_dir, reward_funcs=bleu, args=args,
                              train_dataset=dataset, processing_class=tokenizer,
                              callbacks=[StepTimer()])
    trainer.train()
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  return out


# -- Tunix -----------------------------------------------------------------------------------------


def tunix_python(create: bool = True) -> str:
  """The python of the Tunix virtual environment, created on first use.

  A venv with the system site packages: it sees our jax, flax and transformers, and pip puts
  there only what Tunix adds or pins differently (safetensors<0.8), leaving ours unchanged.
  """
  python = os.path.join(TUNIX_VENV, 'bin', 'python')
  if os.path.exists(python) or not create:
    return python
  print(f'bench_grpo: creating {TUNIX_VENV} with google-tunix=={TUNIX_VERSION} ...', flush=True)
  subprocess.run([sys.executable, '-m', 'venv', '--system-site-packages', TUNIX_VENV], check=True)
  subprocess.run([python, '-m', 'pip', 'install', '--quiet', f'google-tunix=={TUNIX_VERSION}'],
                 check=True)
  return python


def run_tunix(model_dir: str, tok_dir: str, task: Task, steps: int,
              timeout: float = 1800) -> dict[str, Any]:
  """Tunix's GRPOLearner on the same task, in its venv: per-step seconds and rewards."""
  python = tunix_python()
  with tempfile.TemporaryDirectory(prefix='tunix-grpo-') as workdir:
    spec = os.path.join(workdir, 'spec.json')
    result = os.path.join(workdir, 'result.json')
    with open(spec, 'w') as f:
      json.dump(dict(model_dir=model_dir, tok_dir=tok_dir, prompts=task.prompt_texts,
                     references=task.references, steps=steps, workdir=workdir,
                     result=result), f)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'TOKENIZERS_PARALLELISM': 'false',
           'HF_HUB_OFFLINE': '1'}
    proc = subprocess.run([python, '-m', 'benchmarks.bench_grpo', '--tunix-worker', spec],
                          cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not os.path.exists(result):
      tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
      raise RuntimeError(f'Tunix worker exited with {proc.returncode}:\n' + '\n'.join(tail))
    with open(result) as f:
      return json.load(f)


def tunix_worker(spec_path: str) -> None:
  """Runs in the Tunix venv: GRPOLearner on model M for spec['steps'] + 1 steps."""
  with open(spec_path) as f:
    spec = json.load(f)
  import jax
  import jax.numpy as jnp
  import optax
  import transformers
  from tunix.models.llama3 import model as llama_lib
  from tunix.models.llama3 import params as llama_params
  from tunix.rl import rl_cluster as rl_cluster_lib
  from tunix.rl.grpo import grpo_learner
  from tunix.rl.rollout import base_rollout
  from tunix.sft import metrics_logger

  with open(os.path.join(spec['model_dir'], 'config.json')) as f:
    hf = json.load(f)
  rope = hf.get('rope_parameters') or {}
  config = llama_lib.ModelConfig(
      num_layers=hf['num_hidden_layers'], vocab_size=hf['vocab_size'],
      embed_dim=hf['hidden_size'], hidden_dim=hf['intermediate_size'],
      num_heads=hf['num_attention_heads'],
      head_dim=hf.get('head_dim') or hf['hidden_size'] // hf['num_attention_heads'],
      num_kv_heads=hf['num_key_value_heads'],
      rope_theta=int(rope.get('rope_theta', hf.get('rope_theta', 10000.0))),
      norm_eps=hf['rms_norm_eps'], weight_tying=hf['tie_word_embeddings'])
  mesh = jax.make_mesh((1, 1), ('fsdp', 'tp'), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  load = lambda: llama_params.create_model_from_safe_tensors(spec['model_dir'], config, mesh,
                                                            dtype=jnp.float32)
  actor, reference = load(), load()
  tokenizer = transformers.AutoTokenizer.from_pretrained(spec['tok_dir'])
  steps = spec['steps'] + 1  # one more: the reward calls delimit the steps
  optimizer = optax.chain(optax.clip_by_global_norm(MAX_GRAD_NORM),
                          optax.adamw(LEARNING_RATE, b1=0.9, b2=0.999, eps=1e-8,
                                      weight_decay=0.0))
  cluster_config = rl_cluster_lib.ClusterConfig(
      role_to_mesh={rl_cluster_lib.Role.ACTOR: mesh, rl_cluster_lib.Role.REFERENCE: mesh,
                    rl_cluster_lib.Role.ROLLOUT: mesh},
      rollout_engine='vanilla', offload_to_cpu=False,
      training_config=rl_cluster_lib.RLTrainingConfig(
          actor_optimizer=optimizer, eval_every_n_steps=10 ** 9, max_steps=steps,
          metrics_logging_options=metrics_logger.MetricsLoggerOptions(
              log_dir=os.path.join(spec['workdir'], 'logs'), flush_every_n_steps=10 ** 9)),
      rollout_config=base_rollout.RolloutConfig(
          max_tokens_to_generate=NEW_TOKENS, max_prompt_length=PROMPT_LEN,
          kv_cache_size=PROMPT_LEN + NEW_TOKENS + 32, temperature=1.0, top_p=1.0, top_k=None,
          eos_tokens=[EOS]))
  cluster = rl_cluster_lib.RLCluster(actor=actor, reference=reference, tokenizer=tokenizer,
                                     cluster_config=cluster_config)
  out: dict[str, list] = {'stamps': [], 'rewards': [], 'lengths': []}

  def bleu(prompts, completions, reference, **kwargs):
    del prompts, kwargs
    out['stamps'].append(time.perf_counter())
    scores = sentence_bleu(completions, list(reference))
    out['rewards'].append(float(np.mean(scores)))
    out['lengths'].append(float(np.mean([len(tokenizer.encode(c, add_special_tokens=False))
                                         for c in completions])))
    return scores

  learner = grpo_learner.GRPOLearner(
      rl_cluster=cluster, reward_fns=bleu,
      algo_config=grpo_learner.GRPOConfig(
          num_generations=GROUP, num_iterations=1, beta=BETA, epsilon=EPSILON,
          kl_loss_mode='low_var_kl', loss_agg_mode='sequence-mean-token-mean'))
  # Arrays, not lists: Tunix repeats each leaf of a batch G times (a list's strings are leaves).
  dataset = [{'prompts': np.asarray(spec['prompts']),
              'reference': np.asarray(spec['references'])}] * steps
  learner.train(dataset)
  stamps = out.pop('stamps')
  out['times'] = list(np.diff(stamps))
  out['rewards'], out['lengths'] = out['rewards'][:-1], out['lengths'][:-1]
  from importlib import metadata
  out['versions'] = {k: metadata.version(k) for k in ('google-tunix', 'jax', 'flax',
                                                      'safetensors')}
  with open(spec['result'], 'w') as f:
    json.dump(out, f)


# -- The section -----------------------------------------------------------------------------------


def peer_limits(floor_s: float, ours_s: float, peers: dict[str, float]) -> str | None:
  """Why a missed speed-up goal over a peer is out of reach (None when every goal is met).

  A side's speed-up over a peer is the peer's multiple of the floor over its own, so a peer close
  to the floor caps it: no step at or above the floor beats the peer by more than its multiple.
  """
  goals = {'TRL': GOAL_TRL, 'Tunix': GOAL_TUNIX}
  missed = [(peer, goals[peer], s / floor_s) for peer, s in peers.items()
            if s / ours_s < goals[peer]]
  if not missed:
    return None
  bounds = '; '.join(
      f'{peer} ran at {x:.2f}x the floor, so a step at the floor itself would be {x:.2f}x '
      f'faster (the {goal}x goal needs ours at {x / goal:.2f}x the floor)'
      for peer, goal, x in missed)
  return (f'What limits the ratios to the peers: {bounds}. The goals assume the peers at '
          f'{GOAL_TRL * GOAL_FLOOR:.1f}x (TRL) and {GOAL_TUNIX * GOAL_FLOOR:.1f}x (Tunix) their '
          'floors, the multiples the issue measured on its reference run.')


def _plot(curves: dict[str, list[float]], path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 3.5))
  for name, values in curves.items():
    ax.plot(range(1, len(values) + 1), values, marker='o', label=name)
  ax.set_xlabel('GRPO step')
  ax.set_ylabel('mean sentence BLEU of the 64 completions')
  ax.set_title('GRPO on model M: reward per step')
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _attempt(fn, *args, **kwargs) -> tuple[dict | None, str | None]:
  try:
    return fn(*args, **kwargs), None
  except Exception as e:  # pylint: disable=broad-except  (a peer's failure is a result)
    return None, f'{type(e).__name__}: {e}'.strip()


# Our decoder layers unrolled rather than scanned: measured faster here for both the sampler and
# the update (as in bench_train), at a few seconds more compilation.
OURS = dict(scan_layers=False)


def run(env: common.Env, quick: bool) -> common.Section:
  warmup, reps = (1, 5) if quick else (2, 8)
  steps = warmup + reps
  model_dir = common.model_m_dir()
  tok_dir = tokenizer_dir(common.MODEL_M['vocab_size'])
  task = make_task(common.MODEL_M['vocab_size'])
  _check_reward_views(tok_dir, common.MODEL_M['vocab_size'])
  floor = grpo_step_flops(common.MODEL_M)
  executed = shared_prefix_flops(common.MODEL_M)
  peak = env.matmul_gflops * 1e9
  floor_s = floor['total'] / peak

  results: dict[str, dict | None] = {}
  errors: dict[str, str] = {}
  wall: dict[str, float] = {}
  for name, fn, args, kwargs in (
      ('ours', run_ours, (model_dir, task, steps), dict(cost_analysis=not quick, **OURS)),
      ('TRL', run_trl, (model_dir, tok_dir, task, steps), {}),
      ('Tunix', run_tunix, (model_dir, tok_dir, task, steps), {})):
    start = time.perf_counter()
    results[name], err = _attempt(fn, *args, **kwargs)
    wall[name] = time.perf_counter() - start
    if err:
      errors[name] = err

  rows, figures, timings = [], {}, {}
  for name, res in results.items():
    if res is None:
      rows.append([name, 'failed (below)', '', '', '', '', f'{wall[name]:.0f}'])
      continue
    t = step_stats(res['times'], warmup)
    timings[name] = t
    rows.append([name, f'{t.median:.3g} (min {t.min:.3g}, max {t.max:.3g}, n={t.reps})',
                 PROMPTS * GROUP / t.median, t.median / floor_s,
                 floor['total'] / t.median / 1e9,
                 float(np.mean(res['lengths'][:steps])) if res.get('lengths') else '',
                 f'{wall[name]:.0f}'])
    key = name.lower()
    figures[f'grpo_{key}_s_per_step'] = t.median
    figures[f'grpo_{key}_x_floor'] = t.median / floor_s

  tunix_versions = (results.get('Tunix') or {}).get('versions', {})
  lines = [
      f'Model M, float32, {PROMPTS} prompts x {PROMPT_LEN} tokens, G = {GROUP} completions of at '
      f'most {NEW_TOKENS} tokens (temperature 1, eos ends one), beta {BETA} with a frozen '
      f'reference (k3 KL), clip epsilon {EPSILON}, mu = 1, sentence-BLEU reward, advantages '
      'normalised per group, loss averaged per sequence then over sequences, full-parameter '
      f'AdamW lr {LEARNING_RATE:g} with global-norm clipping {MAX_GRAD_NORM:g}. Prompts, '
      'weights and reward are the same on the three sides; each side draws its own samples. '
      f'{warmup} warm-up + {reps} timed steps per side, all three in this invocation.',
      '',
      '- ours: `rvlf_jax.train.grpo_text.TextGRPOTrainer` (decoder layers unrolled, '
      '`scan_layers=False`), each prompt prefilled once per group for sampling and for teacher '
      'forcing.',
      '- TRL: `GRPOTrainer` (torch CPU, float32, gradient checkpointing and bf16 off, '
      '`loss_type="grpo"`, `scale_rewards="group"`, HF `generate` on the prompts repeated G '
      'times).',
      f'- Tunix {tunix_versions.get("google-tunix", TUNIX_VERSION)}: `GRPOLearner` on its '
      'Llama-3 class (`tunix.models.llama3`) loading the same safetensors, vanilla rollout, '
      '`kl_loss_mode="low_var_kl"` (k3), run as a subprocess in its own venv (jax '
      f'{tunix_versions.get("jax", "?")}, flax {tunix_versions.get("flax", "?")}, the same as '
      f'ours; safetensors {tunix_versions.get("safetensors", "?")}; see '
      'benchmarks/requirements.txt). Its vanilla rollout seeds every step\'s sampling with the '
      'same key (`RolloutConfig.seed` defaults to PRNGKey(0) per call), so its steps sample '
      'nearly the same completions.',
      '',
      f'Compute floor of one step: {floor["total"] / 1e12:.3g} TFLOP (policy forward+backward '
      f'{floor["policy"] / 1e12:.3g}, reference forward {floor["reference"] / 1e12:.3g}, '
      f'sampling with prompts prefilled once per group {floor["sampling"] / 1e12:.3g}) = '
      f'{floor_s:.3g} s at the {env.matmul_gflops:.0f} GFLOP/s matmul peak measured in this run.',
      '',
      common.table(['side', 's / step (median)', 'completions / s', 'x floor',
                    'floor GFLOP / s', 'mean completion tokens', 'wall s (all steps, setup)'],
                   rows),
      '',
  ]
  ours = results.get('ours')
  if ours is not None:
    ot = timings['ours']
    piece = lambda k: statistics.median(ours[k][warmup:])
    pieces = [('sampling (prefill once per group, G x B rows per token)', piece('sampling'),
               executed['sampling']),
               ('rewards and advantages (host)', piece('reward_time'), 0.0),
               ('reference forward + policy update', piece('update'),
                executed['policy'] + executed['reference'])]
    lines += [
        f'Where our step goes (medians of the timed steps). Teacher forcing runs each prompt once '
        f'per group, so ours executes {executed["total"] / 1e12:.3g} TFLOP of the floor\'s '
        f'{floor["total"] / 1e12:.3g} (same loss and gradient; `tests/train/test_grpo_text.py` '
        'checks it against whole sequences):', '',
        common.table(['piece', 's', 'TFLOP executed', 'GFLOP/s', 'of the matmul peak'],
                     [[n, sec, f / 1e12 if f else '-', f / sec / 1e9 if f else '-',
                       f'{f / sec / peak:.0%}' if f else '-'] for n, sec, f in pieces]), '']
    if ours.get('xla_flops'):
      xf = ours['xla_flops']
      lines += [f'XLA cost analysis of the compiled pieces: update {xf["update"] / 1e12:.3g} '
                f'TFLOP, reference {xf["reference"] / 1e12:.3g} TFLOP.', '']
    figures['grpo_ours_completions_per_s'] = PROMPTS * GROUP / ot.median
    x_floor = ot.median / floor_s
    goals = [f'ours at {x_floor:.2f}x the floor (goal <= {GOAL_FLOOR}x): ' +
             ('met' if x_floor <= GOAL_FLOOR else f'missed by {x_floor / GOAL_FLOOR:.2f}x')]
    for peer, goal in (('TRL', GOAL_TRL), ('Tunix', GOAL_TUNIX)):
      if peer in timings:
        ratio = timings[peer].median / ot.median
        figures[f'grpo_speedup_vs_{peer.lower()}'] = ratio
        goals.append(f'{ratio:.2f}x faster than {peer} (goal >= {goal}x): ' +
                     ('met' if ratio >= goal else f'missed by {goal / ratio:.2f}x'))
      else:
        goals.append(f'vs {peer}: not measured ({peer} failed)')
    lines += ['**Goals:** ' + '; '.join(goals) + '.', '']
    limits = peer_limits(floor_s, ot.median, {k: timings[k].median for k in ('TRL', 'Tunix')
                                                if k in timings})
    lines += [limits, ''] if limits else []
    if x_floor > GOAL_FLOOR:
      worst = max(pieces, key=lambda p: p[1] - (p[2] / peak))
      lines += [f'What limits ours: the piece furthest above its own FLOPs at peak is '
                f'"{worst[0]}" ({worst[1]:.3g} s for {worst[2] / peak:.3g} s of matmul work).', '']
  for name, err in errors.items():
    lines += [f'**{name} failed** (measured, not a number): `{err[-800:]}`', '']

  curves = {name: res['rewards'][:steps] for name, res in results.items() if res}
  files = []
  if curves:
    _plot(curves, os.path.join(os.path.dirname(os.path.abspath(__file__)), PLOT))
    files.append(PLOT)
    header = ['step'] + list(curves)
    table_rows = [[i + 1] + [c[i] if i < len(c) else '' for c in curves.values()]
                  for i in range(max(map(len, curves.values())))]
    lines += ['Mean reward per step (the same steps, warm-up included; each side draws its own '
              'samples):', '', f'![GRPO reward per step]({PLOT})', '',
              common.table(header, table_rows), '']
  return common.Section('GRPO step (text task on model M)', '\n'.join(lines), figures, files)


def _check_reward_views(tok_dir: str, vocab_size: int) -> None:
  """Our id -> words view equals the peers' decode -> words on ids with eos, pad and unk."""
  import transformers
  tokenizer = transformers.AutoTokenizer.from_pretrained(tok_dir)
  v = vocab_size
  ids = np.array([[5, 17, UNK, v // 2, EOS, 9, PAD], [3, v - 1, 16, PAD, PAD, PAD, PAD]])
  ours = RewardWords().decode_batch(ids)
  theirs = [reward_words(tokenizer.decode(row[:list(row).index(EOS)] if EOS in row else row,
                                          skip_special_tokens=True)) for row in ids.tolist()]
  if ours != theirs:
    raise AssertionError(f'reward views differ: {ours} vs {theirs}')


def main() -> None:
  if len(sys.argv) == 3 and sys.argv[1] == '--tunix-worker':  # in the Tunix venv (run_tunix)
    tunix_worker(sys.argv[2])
    return
  from benchmarks import run as run_lib
  run_lib.standalone(run)


if __name__ == '__main__':
  main()

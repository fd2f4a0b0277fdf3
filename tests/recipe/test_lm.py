"""Text-only decoder pretraining: it learns, and its HF folder is real (transformers reads it).

One short training (module fixture) serves every test that needs trained weights: on this CPU
the compile of the training step costs more than the steps themselves.
"""

import json
import math
import os
import random

import jax
import numpy as np
import pytest
import torch
import transformers

from rvlf_jax.data.tokenizers import SentencePieceTokenizer
from rvlf_jax.hf import ConversionError, api, load_hf, save_hf
from rvlf_jax.models import vit
from rvlf_jax.models.decoder import Decoder, DecoderConfig
from rvlf_jax.recipe import lm
from tests.helpers import fast_jit

SUBJECTS = ['the weather', 'tomorrow', 'the wind', 'clouds', 'rain', 'the sun', 'snow', 'fog']
VERBS = ['will be', 'is', 'stays', 'turns']
ADJECTIVES = ['sunny', 'cloudy', 'cold', 'warm', 'windy', 'mild', 'wet', 'dry']
TAILS = ['in the morning', 'at night', 'on monday', 'near the coast', 'in the south', 'later']

LM = lm.LMConfig(steps=60, batch_size=32, learning_rate=3e-3, warmup_steps=10, max_len=24,
                 seed=0, log_every=20)


def weather_corpus(n=300, seed=0):
  """Short sentences from a small grammar: easy to model, so the loss must fall fast."""
  r = random.Random(seed)
  return [f'{r.choice(SUBJECTS)} {r.choice(VERBS)} {r.choice(ADJECTIVES)} {r.choice(TAILS)}.'
          for _ in range(n)]


@pytest.fixture(scope='module')
def corpus():
  return weather_corpus()


@pytest.fixture(scope='module')
def tokenizer(corpus):
  return SentencePieceTokenizer.train(corpus, 200)


@pytest.fixture(scope='module')
def config(tokenizer):
  return DecoderConfig.tiny('llama', vocab_size=tokenizer.vocab_size, hidden_size=32,
                            intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                            head_dim=16, max_position_embeddings=64,
                            bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                            pad_token_id=tokenizer.pad_id)


@pytest.fixture(scope='module')
def trained(config, tokenizer, corpus, tmp_path_factory):
  """pretrain_to_hf once; also returns the parameters it handed to save_hf and its log."""
  out = str(tmp_path_factory.mktemp('lm') / 'decoder')
  saved, logs = [], []

  def spy(cfg, params, path, **kwargs):
    saved.append(jax.device_get(params))
    save_hf(cfg, params, path, **kwargs)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(lm, 'save_hf', spy)
    folder = lm.pretrain_to_hf(config, tokenizer, corpus, LM, out, log=logs.append)
  assert len(saved) == 1
  return folder, saved[0], logs


def logits(config, params, tokens):
  """float32[B, T, V] of Decoder(config) on int[B, T] tokens, compiled (op-by-op is slower)."""
  apply = fast_jit(lambda p, t: Decoder(config).apply({'params': p}, t).logits)
  return np.asarray(apply(params, np.asarray(tokens, np.int32)))


def read_stats(folder):
  with open(os.path.join(folder, lm.STATS_FILE)) as f:
    return json.load(f)


def test_loss_falls(trained, tokenizer):
  folder, _, logs = trained
  stats = read_stats(folder)
  assert stats['steps'] == LM.steps and stats['texts'] == 300 and stats['seconds'] > 0
  # From about uniform over the vocabulary to a fraction of it.
  assert abs(stats['loss_first'] - math.log(tokenizer.vocab_size)) < 1.0
  assert stats['loss_last'] < 0.45 * stats['loss_first'], stats
  steps = [line for line in logs if line.startswith('lm step')]
  assert [s.split(':')[0] for s in steps] == ['lm step 1/60', 'lm step 20/60', 'lm step 40/60',
                                              'lm step 60/60']
  assert 'compiled' in steps[0]
  assert all('loss' in s and 'eta' in s and 'steps/s' in s for s in steps[1:])


def test_folder_reads_back_bit_identical(trained, config):
  folder, params, _ = trained
  assert sorted(os.listdir(folder)) == sorted([
      'config.json', 'model.safetensors', lm.STATS_FILE, 'tokenizer.json',
      'tokenizer_config.json', 'tokenizer.model'])
  loaded_config, loaded = lm.load_pretrained(folder)
  assert loaded_config == config
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  # load_hf directly gives the same; the logits agree to the bit.
  _, direct = load_hf(folder)
  jax.tree.map(np.testing.assert_array_equal, direct, params)
  tokens = [[2, 5, 9, 7, 1]]
  np.testing.assert_array_equal(logits(loaded_config, loaded, tokens),
                                logits(config, params, tokens))


def test_transformers_reads_the_folder(trained, tokenizer):
  folder, params, _ = trained
  hf_tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
  text = 'the wind turns cold near the coast.'
  ids = hf_tok(text)['input_ids']
  assert ids == [tokenizer.bos_id] + tokenizer.encode(text)
  model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                            local_files_only=True).eval()
  with torch.no_grad():
    theirs = model(torch.tensor([ids])).logits.numpy()
  config, loaded = lm.load_pretrained(folder)
  np.testing.assert_allclose(logits(config, loaded, [ids]), theirs, atol=1e-4, rtol=0)
  # The trained model, run by transformers, continues a sentence of its corpus sensibly.
  prompt = hf_tok('the weather will', return_tensors='pt')['input_ids']
  out = model.generate(prompt, max_new_tokens=12, do_sample=False)
  words = hf_tok.decode(out[0], skip_special_tokens=True).split()
  assert words[:3] == ['the', 'weather', 'will'] and words[3] == 'be', words


def test_second_call_reuses_the_folder(trained, config, tokenizer, corpus):
  folder, _, _ = trained
  before = {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in os.listdir(folder)}
  stats = read_stats(folder)
  logs = []
  # log_every changes nothing that was trained, so it does not make the folder stale.
  again = lm.pretrain_to_hf(config, tokenizer, corpus, lm.LMConfig(**{**vars(LM), 'log_every': 7}),
                            folder, log=logs.append)
  assert again == folder
  assert len(logs) == 1 and 'reused' in logs[0], logs
  assert {n: os.stat(os.path.join(folder, n)).st_mtime_ns for n in os.listdir(folder)} == before
  assert read_stats(folder) == stats


class _Retrained(Exception):
  pass


@pytest.mark.parametrize('change', ['steps', 'texts', 'config'])
def test_other_inputs_retrain(trained, config, tokenizer, corpus, monkeypatch, change):
  folder, _, _ = trained

  def fake_pretrain(*args, **kwargs):
    raise _Retrained

  monkeypatch.setattr(lm, 'pretrain', fake_pretrain)
  lm_config, texts = LM, corpus
  if change == 'steps':
    lm_config = lm.LMConfig(**{**vars(LM), 'steps': LM.steps + 1})
  elif change == 'texts':
    texts = corpus[:-1]
  else:
    config = config.replace(rms_norm_eps=1e-5)
  logs = []
  with pytest.raises(_Retrained):
    lm.pretrain_to_hf(config, tokenizer, texts, lm_config, folder, log=logs.append)
  assert 'pretraining again' in logs[0], logs
  # Nothing is replaced until the new training has finished.
  assert read_stats(folder)['steps'] == LM.steps


def test_refuses_a_folder_it_did_not_write(config, tokenizer, corpus, tmp_path):
  (tmp_path / 'notes.txt').write_text('mine')
  with pytest.raises(FileExistsError, match='not written by pretrain_to_hf'):
    lm.pretrain_to_hf(config, tokenizer, corpus, LM, tmp_path, log=lambda _: None)
  assert (tmp_path / 'notes.txt').read_text() == 'mine'


@pytest.mark.parametrize('texts', [[], ['', '  \n']])
def test_empty_corpus(config, tokenizer, tmp_path, texts):
  with pytest.raises(ValueError, match='empty corpus'):
    lm.pretrain(config, tokenizer, texts, LM, log=lambda _: None)
  with pytest.raises(ValueError, match='empty corpus'):
    lm.pretrain_to_hf(config, tokenizer, texts, LM, tmp_path / 'out', log=lambda _: None)
  assert not (tmp_path / 'out').exists()


def test_tokenize_layout_and_truncation(tokenizer):
  short, long = 'rain is wet.', ' '.join(['the sun is warm'] * 10)
  corpus = lm.tokenize(tokenizer, [short, '', long], max_len=12)
  assert corpus.tokens.shape == (2, 12) and corpus.truncated == 1
  ids = tokenizer.encode(short)
  expected = [tokenizer.bos_id] + ids + [tokenizer.eos_id]
  assert corpus.tokens[0, :len(expected)].tolist() == expected
  assert corpus.mask[0].tolist() == [True] * len(expected) + [False] * (12 - len(expected))
  assert (corpus.tokens[0, len(expected):] == tokenizer.pad_id).all()
  # A cut text keeps its start and loses its eos.
  assert corpus.tokens[1].tolist() == [tokenizer.bos_id] + tokenizer.encode(long)[:11]
  assert corpus.mask[1].all()


def test_tokenizer_must_fit_the_decoder(config, tokenizer, corpus):
  with pytest.raises(ValueError, match='embeddings'):
    lm.pretrain(config.replace(vocab_size=tokenizer.vocab_size - 1), tokenizer, corpus, LM)
  with pytest.raises(ValueError, match='eos_token_id'):
    lm.pretrain(config.replace(eos_token_id=7), tokenizer, corpus, LM)
  with pytest.raises(ValueError, match='max_position_embeddings'):
    lm.pretrain(config.replace(max_position_embeddings=8), tokenizer, corpus, LM)


def test_load_pretrained_errors(tmp_path):
  missing = str(tmp_path / 'nothing')
  with pytest.raises(FileNotFoundError, match=missing):
    lm.load_pretrained(missing)
  with pytest.raises(ConversionError, match='config.json'):
    lm.load_pretrained(str(tmp_path))
  vit_config = vit.VitConfig.tiny()
  abstract = api.family_for(vit_config.to_hf_config()['model_type'], 'test').abstract_params(
      vit_config)
  folder = str(tmp_path / 'vit')
  save_hf(vit_config, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract), folder)
  with pytest.raises(ConversionError, match='not a decoder'):
    lm.load_pretrained(folder)

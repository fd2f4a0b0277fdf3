"""Tokenizers: a sentencepiece model trained in the test, HF tokenizers built locally (no
downloads), and the prompt layout around the sign tokens."""

import random

import numpy as np
import pytest

from rvlf_jax.data import tokenizers as tk

SUBJECTS = ['the weather', 'tomorrow', 'in the north', 'the wind', 'clouds', 'rain', 'the sun',
            'temperatures', 'snow', 'fog', 'the night']
VERBS = ['will be', 'is expected to be', 'remains', 'becomes', 'turns', 'stays']
ADJECTIVES = ['sunny', 'cloudy', 'cold', 'warm', 'windy', 'mild', 'wet', 'dry', 'stormy', 'clear']
TAILS = ['in the morning', 'at night', 'on monday', 'near the coast', 'in the south', 'later',
         'all day', 'in the evening']


def synthetic_corpus(n=500, seed=0):
  r = random.Random(seed)
  return [f'{r.choice(SUBJECTS)} {r.choice(VERBS)} {r.choice(ADJECTIVES)} {r.choice(TAILS)}'
          + r.choice(['.', '!', '', ' with 12 degrees.']) for _ in range(n)]


@pytest.fixture(scope='module')
def corpus():
  return synthetic_corpus()


@pytest.fixture(scope='module', params=['unigram', 'bpe'])
def spm_tok(request, corpus, tmp_path_factory):
  path = tmp_path_factory.mktemp(request.param) / 'spm.model'
  return tk.SentencePieceTokenizer.train(corpus, 200, path, model_type=request.param)


def test_spm_round_trip_and_fixed_ids(spm_tok, corpus):
  assert (spm_tok.pad_id, spm_tok.eos_id, spm_tok.bos_id, spm_tok.unk_id) == (0, 1, 2, 3)
  assert [spm_tok.id_to_piece(i) for i in range(4)] == ['<pad>', '<eos>', '<bos>', '<unk>']
  assert 50 < spm_tok.vocab_size <= 200
  for text in corpus[:50] + ['rain turns cold at night', '  snow   stays\tdry  ']:
    ids = spm_tok.encode(text)
    assert ids and min(ids) > spm_tok.unk_id  # No specials added, nothing unknown.
    assert spm_tok.decode(ids) == ' '.join(text.split())
  # Decoding stops at eos and drops pad and bos.
  ids = spm_tok.encode('the sun')
  assert spm_tok.decode([spm_tok.bos_id] + ids + [spm_tok.eos_id] + ids + [0, 0]) == 'the sun'
  assert spm_tok.decode(np.array(ids + [0, 0], np.int32)) == 'the sun'


def test_spm_load(spm_tok, corpus):
  loaded = tk.SentencePieceTokenizer.load(spm_tok.path)
  assert loaded.model_proto == spm_tok.model_proto
  assert loaded.encode(corpus[0]) == spm_tok.encode(corpus[0])


@pytest.mark.parametrize('model_type', ['unigram', 'bpe'])
def test_spm_training_is_deterministic(corpus, tmp_path, model_type):
  a = tk.SentencePieceTokenizer.train(corpus, 200, tmp_path / 'a.model', model_type=model_type)
  # A generator, as a streamed corpus would be.
  b = tk.SentencePieceTokenizer.train((s for s in corpus), 200, tmp_path / 'b.model',
                                      model_type=model_type)
  assert (tmp_path / 'a.model').read_bytes() == (tmp_path / 'b.model').read_bytes()
  assert a.model_proto == b.model_proto
  c = tk.SentencePieceTokenizer.train(corpus[:400], 200, model_type=model_type)
  assert c.model_proto != a.model_proto  # The check above can fail.


def test_spm_bad_inputs(corpus):
  with pytest.raises(ValueError, match='empty corpus'):
    tk.SentencePieceTokenizer.train(['', '  '], 100)
  with pytest.raises(TypeError, match='not one string'):
    tk.SentencePieceTokenizer.train('the sun', 100)
  with pytest.raises(ValueError, match='eos_id'):
    tk.SentencePieceTokenizer.train(corpus, 100, eos_id=5)


def test_encode_batch_pads_right(spm_tok):
  texts = ['the sun', 'rain turns cold at night', '']
  rows = [spm_tok.encode(t) for t in texts]
  ids, mask = spm_tok.encode_batch(texts, 16, add_bos=True, add_eos=True)
  assert ids.dtype == np.int32 and ids.shape == (3, 16) and mask.dtype == bool
  for b, row in enumerate(rows):
    seq = [spm_tok.bos_id] + row + [spm_tok.eos_id]
    assert ids[b, :len(seq)].tolist() == seq
    assert (ids[b, len(seq):] == spm_tok.pad_id).all()
    assert mask[b].tolist() == [True] * len(seq) + [False] * (16 - len(seq))
  assert spm_tok.decode_batch(ids) == ['the sun', 'rain turns cold at night', '']
  # max_len None: as long as the longest; truncation keeps eos.
  ids, mask = spm_tok.encode_batch(texts, add_eos=True)
  assert ids.shape == (3, len(rows[1]) + 1) and mask[1].all()
  ids, mask = spm_tok.encode_batch(texts, 3, add_eos=True)
  assert ids[1].tolist() == rows[1][:2] + [spm_tok.eos_id]
  with pytest.raises(ValueError, match='text 1'):
    spm_tok.encode_batch(texts, 3, truncate=False)


def test_spm_save_as_hf_matches(spm_tok, corpus, tmp_path):
  from transformers import AutoTokenizer
  spm_tok.save_as_hf(tmp_path)
  hf = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
  texts = corpus[:100] + ['  the  wind\tturns cold  ', 'in the north\nrain', 'ﬁne ｗｉｎｄ',
                          '', 'Zebra QUX 99']
  for text in texts:
    ids = spm_tok.encode(text)
    assert hf.encode(text, add_special_tokens=False) == ids, text
    if spm_tok.unk_id not in ids:  # HF drops unk on decode; sentencepiece prints ' ⁇ '.
      assert hf.decode(ids, skip_special_tokens=True) == spm_tok.decode(ids)
  assert hf.encode('the sun') == [spm_tok.bos_id] + spm_tok.encode('the sun')
  assert (hf.pad_token_id, hf.eos_token_id, hf.bos_token_id, hf.unk_token_id) == (0, 1, 2, 3)
  assert len(hf) == spm_tok.vocab_size
  # Loads through our wrapper too, and refuses to overwrite.
  wrapped = tk.HFTokenizer.load(tmp_path)
  assert wrapped.encode(corpus[0]) == spm_tok.encode(corpus[0])
  assert (tmp_path / 'tokenizer.model').read_bytes() == spm_tok.model_proto
  with pytest.raises(FileExistsError, match='tokenizer.json'):
    spm_tok.save_as_hf(tmp_path)


def test_spm_byte_fallback_save_as_hf(corpus, tmp_path):
  from transformers import AutoTokenizer
  tok = tk.SentencePieceTokenizer.train(corpus, 300, byte_fallback=True)
  tok.save_as_hf(tmp_path)
  hf = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
  text = 'Überall Regen 你好 with 12 degrees'
  ids = tok.encode(text)
  assert tok.unk_id not in ids and tok.decode(ids) == text
  assert hf.encode(text, add_special_tokens=False) == ids
  assert hf.decode(ids, skip_special_tokens=True) == text


# ----------------------------------------------------------------------------- HF tokenizers

WORDS = ['<pad>', '<eos>', '<bos>', '<unk>', '<|user|>', '<|assistant|>', '<|end|>', 'translate',
         'the', 'sign', 'language', 'video', 'into', 'german', '.', 'hello', 'world', 'rain']
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] | trim }} <|end|> "
    "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}")


def save_word_tokenizer(path, chat_template=None, pad=True):
  """A tiny word-level fast tokenizer written as an HF folder (what a decoder import has)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token='<unk>'))
  backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  backend.decoder = decoders.WordPiece()
  fast = PreTrainedTokenizerFast(
      tokenizer_object=backend, bos_token='<bos>', eos_token='<eos>', unk_token='<unk>',
      pad_token='<pad>' if pad else None,
      additional_special_tokens=['<|user|>', '<|assistant|>', '<|end|>'])
  if chat_template:
    fast.chat_template = chat_template
  fast.save_pretrained(str(path))
  return path


def test_hf_tokenizer_interface(tmp_path):
  tok = tk.HFTokenizer.load(save_word_tokenizer(tmp_path, pad=False))
  # No pad token: eos stands in.
  assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.vocab_size) == (1, 1, 2, len(WORDS))
  assert tok.chat_template is None
  ids = tok.encode('hello world')
  assert ids == [15, 16]
  assert tok.decode([2] + ids + [1, 17, 1, 1]) == 'hello world'
  batch, mask = tok.encode_batch(['hello world', 'rain'], 4, add_bos=True, add_eos=True)
  assert batch.tolist() == [[2, 15, 16, 1], [2, 17, 1, 1]]
  assert mask.tolist() == [[True] * 4, [True, True, True, False]]
  assert tok.decode_batch(batch) == ['hello world', 'rain']
  with pytest.raises(FileNotFoundError):
    tk.HFTokenizer.load(tmp_path / 'missing')


@pytest.mark.parametrize('chat', [False, True])
def test_prompt_split_around_sign(tmp_path, chat):
  tok = tk.HFTokenizer.load(save_word_tokenizer(tmp_path, CHAT_TEMPLATE if chat else None))
  template = tk.PromptTemplate(instruction='{sign} translate the sign language video into '
                                           '{language} .')
  prompt = template.prompt(tok, 'german')
  words = ['translate', 'the', 'sign', 'language', 'video', 'into', 'german', '.']
  after = [WORDS.index(w) for w in words]
  if chat:
    assert template.text(tok, 'german') == (
        '<bos><|user|> {sign} translate the sign language video into german . <|end|> '
        '<|assistant|> ')
    # The marker at the start of the message survives the template's `trim`.
    assert prompt.before == [2, 4]
    assert prompt.after == after + [6, 5]
  else:
    assert template.text(tok, 'german') == (
        '{sign} translate the sign language video into german .\n')
    assert prompt.before == [2]
    assert prompt.after == after
  # The marker in the middle of the instruction.
  mid = tk.PromptTemplate(instruction='translate the {sign} video into {language} .')
  prompt = mid.prompt(tok, 'german')
  assert prompt.before[-2:] == [7, 8] and prompt.after[:2] == [11, 12]


def test_prompt_with_sentencepiece(spm_tok):
  template = tk.PromptTemplate()
  prompt = template.prompt(spm_tok, 'English')
  assert prompt.before == [spm_tok.bos_id]
  assert spm_tok.decode(prompt.after) == spm_tok.decode(
      spm_tok.encode('Translate the sign language video into English.'))
  with pytest.raises(ValueError, match='exactly once'):
    tk.PromptTemplate(instruction='Translate into {language}.')


def test_target_ids_and_loss_mask(spm_tok):
  ids = tk.target_ids(spm_tok, 'rain turns cold at night')
  assert ids == spm_tok.encode('rain turns cold at night') + [spm_tok.eos_id]
  assert tk.target_ids(spm_tok, 'rain turns cold at night', max_len=2) == ids[:1] + [1]
  mask = tk.loss_mask([2, 4], [3, 5], 8)
  assert mask.astype(int).tolist() == [[0, 0, 1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1, 1]]
  assert tk.loss_mask(1, 2, 4).tolist() == [False, True, True, False]

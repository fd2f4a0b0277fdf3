"""fewshot.dsc: progressive attribute selection, descriptions, dual-level tokens, text encoders."""

import json
import zlib

import numpy as np
import pytest

from rvlf_jax.fewshot import dsc

# ----------------------------------------------------------------------------- hand-made embedders


class TableEmbedder:
  """Fixed vectors per text (unknown texts raise), counting calls."""

  def __init__(self, table):
    self.table = {t: np.asarray(v, np.float32) for t, v in table.items()}
    self.calls = 0

  def embed(self, texts):
    self.calls += 1
    return np.stack([self.table[t] for t in texts])


class BagOfWords:
  """Each word hashed (crc32) to one of E dims; a text is its word-count vector."""

  def __init__(self, dim=64):
    self.dim = dim

  def embed(self, texts):
    out = np.zeros((len(texts), self.dim), np.float32)
    for i, t in enumerate(texts):
      for w in t.lower().replace(',', ' ').replace(':', ' ').replace('.', ' ').split():
        out[i, zlib.crc32(w.encode()) % self.dim] += 1.0
    return out


def fake_lexicon(gloss):
  return {'handshape': f'a {gloss.lower()} handshape', 'orientation': 'palm facing down',
          'location': f'the {gloss.lower()} location', 'movement': 'a circular movement',
          'hands': 'one hand', 'meaning': f'{gloss.lower()} as a greeting'}


# Anchor along x. "flat hand" and "flat handshape" are near-duplicates and the most relevant;
# "at the forehead" is less relevant but different; "off topic" is barely relevant.
CANDIDATES = {
    'flat hand': [0.9, np.sqrt(1 - 0.81), 0.0],
    'flat handshape': [0.89, np.sqrt(1 - 0.89**2), 0.0],
    'at the forehead': [0.8, 0.0, 0.6],
    'off topic': [0.1, -0.5, -0.86],
}
TABLE = {'A sign for HELLO': [1.0, 0.0, 0.0], **CANDIDATES}


def test_selection_is_relevance_then_diversity():
  emb = TableEmbedder(TABLE)
  names = list(CANDIDATES)
  assert dsc.select_attributes('HELLO', names, emb, 1) == ['flat hand']
  # Step 2: the near-duplicate scores 0.89 - 0.5 * 0.9996, the forehead 0.8 - 0.5 * 0.72.
  assert dsc.select_attributes('HELLO', names, emb, 3) == ['flat hand', 'at the forehead',
                                                           'flat handshape']
  assert emb.calls == 2  # one embedding call per selection, not one per step
  # Without the redundancy term: plain top-k by cosine to the anchor.
  assert dsc.select_attributes('HELLO', names, emb, 3, redundancy=0.0) == [
      'flat hand', 'flat handshape', 'at the forehead']
  # Order of the candidates, repeats and blanks do not matter.
  shuffled = ['off topic', ' at the forehead', 'flat handshape', '', 'flat hand', 'flat hand']
  assert dsc.select_attributes('HELLO', shuffled, emb, 4) == [
      'flat hand', 'at the forehead', 'flat handshape', 'off topic']


def test_grow_template_and_describe():
  assert dsc.grow_template('HELLO', []) == 'A sign for HELLO'
  assert dsc.grow_template('HELLO', ['a flat hand', 'a twist']) == (
      'A sign for HELLO, which has a flat hand, and a twist')
  text = dsc.describe('HELLO', ['a flat hand', 'the chin', 'a twist.'])
  assert text == 'A sign for HELLO: made with a flat hand, the chin and a twist.'
  assert dsc.describe('HELLO', ['a flat hand']) == 'A sign for HELLO: made with a flat hand.'
  assert dsc.describe('HELLO', []) == 'A sign for HELLO.'


def test_build_semantics_with_and_without_dsc():
  names = ['HELLO', 'RAIN', 'HOUSE']
  emb = BagOfWords()
  sem = dsc.build_semantics(names, dsc.LexiconAttributes(fake_lexicon), emb, k=3)
  assert sem.text_tokens.shape == (3, 4, 64) and sem.text_tokens.dtype == np.float32
  assert sem.text_mask.shape == (3, 4) and sem.text_mask.dtype == bool and sem.text_mask.all()
  assert sem.class_text.shape == (3, 64) and sem.class_text.dtype == np.float32
  for c, name in enumerate(names):
    attrs = sem.attributes[c]
    assert len(attrs) == 3 and set(attrs) <= set(fake_lexicon(name).values())
    # Bag-of-words relevance: the phrases sharing the class word come first.
    assert set(attrs[:2]) <= {v for v in fake_lexicon(name).values() if name.lower() in v}
    assert all(a in sem.descriptions[c] for a in attrs)
    assert sem.token_texts[c] == (*[f'A sign for {name}, which has {a}' for a in attrs],
                                  sem.descriptions[c])
    np.testing.assert_allclose(sem.text_tokens[c], emb.embed(sem.token_texts[c]))
    np.testing.assert_allclose(sem.class_text[c], emb.embed([sem.descriptions[c]])[0])
  texts = json.loads(sem.to_json())
  assert texts['classes']['RAIN']['attributes'] == list(sem.attributes[1])
  assert texts['text_tokens_shape'] == [3, 4, 64] and 'text_tokens' not in texts
  back = dsc.ClassSemantics.from_dict(json.loads(sem.to_json(with_arrays=True)))
  assert back.texts() == sem.texts()
  np.testing.assert_array_equal(back.text_tokens, sem.text_tokens)

  plain = dsc.build_semantics(names, None, emb, k=3, use_dsc=False)
  assert plain.text_tokens.shape == (3, 1, 64) and plain.text_mask.shape == (3, 1)
  assert plain.attributes == ((), (), ()) and plain.descriptions[0] == 'A sign for HELLO'
  np.testing.assert_allclose(plain.class_text, emb.embed([f'A sign for {n}' for n in names]))


def test_lexicon_keys():
  src = dsc.LexiconAttributes(fake_lexicon, keys=['movement', 'handshape'])
  assert src.candidates('HELLO') == ['a circular movement', 'a hello handshape']
  with pytest.raises(KeyError, match="'HELLO'.*'speed'"):
    dsc.LexiconAttributes(fake_lexicon, keys=['speed']).candidates('HELLO')


def test_errors():
  emb = TableEmbedder(TABLE)
  with pytest.raises(ValueError, match='k must be at least 1, got 0'):
    dsc.select_attributes('HELLO', list(CANDIDATES), emb, 0)
  with pytest.raises(ValueError, match="class 'HELLO' has 2 distinct .* fewer than k=3"):
    dsc.select_attributes('HELLO', ['flat hand', 'flat hand', 'off topic', ' '], emb, 3)
  with pytest.raises(ValueError, match='non-empty'):
    dsc.select_attributes('  ', list(CANDIDATES), emb, 1)
  with pytest.raises(ValueError, match='non-empty'):
    dsc.describe('', ['a'])
  src = dsc.LexiconAttributes(lambda g: {'handshape': 'flat', 'location': ''})
  with pytest.raises(ValueError, match="class 'RAIN' has 1 distinct"):
    dsc.build_semantics(['RAIN'], src, BagOfWords(), k=2)
  with pytest.raises(ValueError, match='non-empty'):
    dsc.build_semantics(['RAIN', ''], src, BagOfWords(), k=1)
  with pytest.raises(ValueError, match='k must be at least 1'):
    dsc.build_semantics(['RAIN'], src, BagOfWords(), k=0, use_dsc=False)
  with pytest.raises(ValueError, match=r"repeat: \['RAIN'\]"):
    dsc.build_semantics(['RAIN', 'RAIN'], src, BagOfWords(), k=1)


# ----------------------------------------------------------------------------- decoder-based parts

WORDS = ['<pad>', '<eos>', '<bos>', '<unk>', 'the', 'a', 'of', 'sign', 'for', 'is', 'hello',
         'rain', 'handshape', 'location', 'movement', 'orientation', 'flat', 'hand', 'chin',
         'twist', 'at', 'with', '.', 'palm', 'down', 'up', 'circle', 'house', 'which', 'has']


@pytest.fixture(scope='module')
def hf_folder(tmp_path_factory):
  """A tiny random Llama and a word-level tokenizer of the same vocabulary, as one HF folder.

  The model is written by our exporter (`save_hf`), not by transformers: building it in torch
  would cost ~15 s of imports here, and `tests/hf` already checks that such folders are what
  transformers reads and writes.
  """
  import jax.numpy as jnp
  import transformers
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers

  from rvlf_jax.hf import save_hf
  from rvlf_jax.models.decoder import Decoder, DecoderConfig
  from tests.helpers import numpy_params
  path = tmp_path_factory.mktemp('tiny_llama') / 'model'
  config = DecoderConfig.tiny('llama', vocab_size=len(WORDS), hidden_size=32,
                              intermediate_size=64, num_heads=4, num_kv_heads=2, head_dim=8,
                              bos_token_id=2, eos_token_id=1, pad_token_id=0)
  save_hf(config, numpy_params(Decoder(config), jnp.zeros((1, 4), jnp.int32)), str(path))
  backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token='<unk>'))
  backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  backend.decoder = decoders.WordPiece()
  transformers.PreTrainedTokenizerFast(
      tokenizer_object=backend, bos_token='<bos>', eos_token='<eos>', unk_token='<unk>',
      pad_token='<pad>').save_pretrained(str(path))
  return str(path)


@pytest.fixture(scope='module')
def embedder(hf_folder):
  return dsc.DecoderEmbedder.load(hf_folder)


def test_decoder_embedder_is_batch_and_padding_independent(embedder):
  texts = ['hello', 'the sign for rain', 'a flat hand at the chin']
  alone = np.concatenate([embedder.embed([t]) for t in texts])
  together = embedder.embed(texts)
  assert together.shape == (3, 32) and together.dtype == np.float32
  np.testing.assert_allclose(together, alone, atol=1e-5)
  # A long neighbour pads every row to a longer bucket (16 -> 32 tokens).
  long_text = ' '.join(['the sign'] * 12)
  padded = embedder.embed([*texts, long_text])
  np.testing.assert_allclose(padded[:3], alone, atol=1e-5)
  # Batched in twos: the same again.
  small = dsc.DecoderEmbedder(embedder.model, embedder.params, embedder.tokenizer, batch_size=2)
  np.testing.assert_allclose(small.embed(texts), alone, atol=1e-5)
  # Not trivially constant.
  assert np.abs(alone[0] - alone[1]).max() > 1e-3
  assert embedder.embed([]).shape == (0, 32)
  with pytest.raises(TypeError, match='sequence of strings'):
    embedder.embed('hello')


def test_decoder_embedder_drives_selection(embedder):
  cands = ['a flat hand', 'the chin', 'a twist', 'palm down']
  picks = dsc.select_attributes('hello', cands, embedder, 2)
  assert len(picks) == 2 and set(picks) <= set(cands)
  assert picks == dsc.select_attributes('hello', cands, embedder, 2)


def test_language_model_attributes(hf_folder):
  src = dsc.LanguageModelAttributes.load(hf_folder, max_new_tokens=6)
  phrases = src.phrases('hello')
  assert list(phrases) == list(dsc.ASPECTS)
  assert all(isinstance(p, str) and not any(e in p for e in '.!?\n') for p in phrases.values())
  assert src.phrases('hello') == phrases  # greedy: deterministic
  cands = src.candidates('hello')
  assert cands == [f'{a}: {t}' for a, t in phrases.items() if t]
  assert all(len(p.split()) <= 6 for p in phrases.values())
  with pytest.raises(ValueError, match='non-empty'):
    src.phrases(' ')

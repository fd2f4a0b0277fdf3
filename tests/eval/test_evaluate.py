"""translate / evaluate on a tiny SLTModel: padded rows skipped, one compile, scores as metrics'."""

import jax.numpy as jnp
import numpy as np
import pytest

from rvlf_jax.data import pipeline
from rvlf_jax.data.tokenizers import Tokenizer
from rvlf_jax.eval import decoding, evaluate, metrics
from rvlf_jax.models import slt
from tests.helpers import fast_jit, keypoint_batch, numpy_params

DV, T = 24, 16
PROMPT = slt.Prompt(before=jnp.asarray([2, 3], jnp.int32), after=jnp.asarray([4], jnp.int32))
N = 5


class WordTokenizer(Tokenizer):
  """Id i <-> word 'w{i}'; every fourth word holds a line break, which files must not split."""

  vocab_size, bos_id, eos_id, pad_id = 128, None, 1, 0

  def encode(self, text):
    return [int(w[1:]) for w in text.split() if w.startswith('w')]

  def _decode(self, ids):
    return ' '.join(f'w{i}' if i % 4 else f'w{i}\nx' for i in ids)


@pytest.fixture(scope='module')
def setup():
  """Model, params and two eval batches of 3 rows: 5 examples, the last row padding."""
  model = slt.SLTModel(slt.SLTConfig.tiny(visual_dim=DV))
  rng = np.random.RandomState(0)
  kp, mask = keypoint_batch(rng, 5, T, (16, 9, 5, 12, 7))
  examples = [{'id': f'ex{i}', 'keypoints': kp[i, :mask[i].sum()],
               'visual': rng.randn(mask[i].sum(), DV).astype(np.float32),
               'text_ids': np.asarray([5 + i, 9, 1], np.int32)} for i in range(5)]
  buckets = pipeline.Buckets(frames=(T,), tokens=(4,))
  batches = [pipeline.collate(examples[:3], buckets, batch_size=3),
             pipeline.collate(examples[3:], buckets, batch_size=3)]
  params = numpy_params(model, dict(batches[0]), PROMPT.before, PROMPT.after)
  return model, params, batches


def test_translate_greedy_skips_padded_rows_and_compiles_once(setup):
  model, params, batches = setup
  tok = WordTokenizer()
  before = evaluate.translate_batch._cache_size()
  pairs = evaluate.translate(model, params, batches, PROMPT, tok, max_new_tokens=N)
  assert evaluate.translate_batch._cache_size() == before + 1  # both batches share one shape
  assert [i for i, _ in pairs] == [f'ex{i}' for i in range(5)]
  # The same as prefill + greedy_decode by hand, decoded up to eos.
  @fast_jit
  def by_hand(params, inputs):
    embeds, positions = model.prefill(params, inputs, PROMPT)
    return decoding.greedy_decode(model.decoder, params['decoder'], embeds, positions,
                                  max_new_tokens=N, eos_id=tok.eos_id)[0]

  want = []
  for batch in batches:
    tokens = by_hand(params, evaluate.model_inputs(batch))
    want += tok.decode_batch(np.asarray(tokens))[:int(batch['example_mask'].sum())]
  assert [h for _, h in pairs] == want
  assert any(h for _, h in pairs)
  with pytest.raises(ValueError, match="decode must be one of"):
    evaluate.translate(model, params, batches, PROMPT, tok, decode='sample')


def test_evaluate_beam_scores_equal_score_corpus(setup, tmp_path):
  model, params, batches = setup
  tok = WordTokenizer()
  pairs = evaluate.translate(model, params, batches, PROMPT, tok, decode='beam', beam_size=2,
                             max_new_tokens=N)
  assert [i for i, _ in pairs] == [f'ex{i}' for i in range(5)]
  hyps = [h for _, h in pairs]
  # References sharing some words with the hypotheses, so that no score is trivially 0.
  refs = [' '.join(h.split()[:-1] + ['w3']) for h in hyps]
  refs_by_id = {f'ex{i}': r for i, r in enumerate(refs)}
  scores = evaluate.evaluate(model, params, batches, PROMPT, tok, lang='de', decode='beam',
                             beam_size=2, max_new_tokens=N, refs_by_id=refs_by_id,
                             output_dir=str(tmp_path))
  want = metrics.score_corpus(hyps, refs, 'de')
  assert scores == want and want['bleu1'] > 0 and want['rouge_l'] > 0
  # The files pair line by line (line breaks flattened) and score the same.
  assert metrics.score_files(tmp_path / 'hyps.txt', tmp_path / 'refs.txt', 'de') == want
  assert metrics.read_lines(tmp_path / 'ids.txt') == [f'ex{i}' for i in range(5)]

  # References carried by the batches themselves ('text'), rows in the same order.
  with_text = [{**b, 'text': np.asarray([refs_by_id.get(i, '') for i in b['id']])}
               for b in batches]
  assert evaluate.evaluate(model, params, with_text, PROMPT, tok, lang='de', decode='beam',
                           beam_size=2, max_new_tokens=N) == want
  with pytest.raises(KeyError, match="no reference for example 'ex4'"):
    evaluate.evaluate(model, params, batches, PROMPT, tok, lang='de', max_new_tokens=N,
                      refs_by_id={f'ex{i}': 'w3' for i in range(4)})

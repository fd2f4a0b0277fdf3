"""launch.convert_hf: HF -> orbax -> HF is bit-exact in transformers; both layer layouts restore."""

import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers
from absl import flags
from absl.testing import flagsaver

from launch import convert_hf
from rvlf_jax.hf import checkpoint, load_hf

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
CASES = {
    'llama': (transformers.LlamaForCausalLM, lambda: transformers.LlamaConfig(**COMMON)),
    'gemma3': (transformers.Gemma3ForCausalLM, lambda: transformers.Gemma3TextConfig(
        **COMMON, head_dim=16, sliding_window=4, query_pre_attn_scalar=16,
        sliding_window_pattern=2)),
}


@pytest.fixture(scope='module', params=sorted(CASES))
def hf_model(request, tmp_path_factory):
  """(name, tiny random model, its HF folder), norms perturbed so that none is trivially 0 or 1."""
  cls, make_config = CASES[request.param]
  torch.manual_seed(0)
  model = cls(make_config()).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  path = tmp_path_factory.mktemp(request.param)
  model.save_pretrained(path)
  return request.param, model, str(path)


def run_cli(**values):
  """Runs convert_hf.main in this process with the given flag values."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  with flagsaver.flagsaver(**values):
    convert_hf.main(['convert_hf'])


def assert_same_state(reloaded, original, dtype=None):
  want, got = original.state_dict(), reloaded.state_dict()
  assert set(got) == set(want)
  for key, value in want.items():
    value = value if dtype is None else value.to(dtype)
    assert got[key].dtype == value.dtype, key
    assert torch.equal(got[key], value), f'{key} differs'


def test_round_trip_in_process(hf_model, tmp_path, capsys):
  name, model, src = hf_model
  run_cli(src=src, dst=str(tmp_path / 'ckpt'))
  run_cli(src=str(tmp_path / 'ckpt'), dst=str(tmp_path / 'hf'))
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].startswith(f'hf->orbax: {model.config.model_type}, ')
  assert lines[1].endswith(f'float32, written to {tmp_path / "hf"}')
  assert_same_state(type(model).from_pretrained(str(tmp_path / 'hf')), model)


def test_restored_layouts_match_hf(hf_model, tmp_path):
  _, _, src = hf_model
  checkpoint.convert_folder(src, str(tmp_path / 'ckpt'))
  for scan_layers in (True, False):
    want_config, want = load_hf(src, scan_layers=scan_layers)
    config, params = checkpoint.load_checkpoint(str(tmp_path / 'ckpt'), scan_layers=scan_layers)
    assert config == want_config
    assert jax.tree.structure(params) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
      assert a.dtype == b.dtype
      np.testing.assert_array_equal(a, b)
  scanned = checkpoint.load_checkpoint(str(tmp_path / 'ckpt'))[1]['transformer']['layers']
  looped = checkpoint.load_checkpoint(str(tmp_path / 'ckpt'), scan_layers=False)[1]['transformer']
  for i in range(2):
    jax.tree.map(lambda stacked, layer: np.testing.assert_array_equal(stacked[i], layer), scanned,
                 looped[f'layers_{i}'])


def test_cli_subprocess_round_trip_bf16_sharded(tmp_path):
  """The real command line: cast to bf16 on import, export in several shards."""
  cls, make_config = CASES['llama']
  torch.manual_seed(1)
  model = cls(make_config()).eval()
  model.save_pretrained(tmp_path / 'src')
  env = {**os.environ, 'PYTHONPATH': REPO, 'JAX_PLATFORMS': 'cpu'}
  env.pop('XLA_FLAGS', None)  # One device is enough; fake devices only slow the start.

  def cli(*args):
    result = subprocess.run([sys.executable, '-m', 'launch.convert_hf', *args], cwd=REPO, env=env,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()

  out = cli(f'--src={tmp_path / "src"}', f'--dst={tmp_path / "ckpt"}', '--dtype=bfloat16')
  num_params = sum(p.numel() for p in model.parameters())
  assert out == (f'hf->orbax: llama, {num_params:,} parameters, bfloat16, written to '
                 f'{tmp_path / "ckpt"}')
  out = cli(f'--src={tmp_path / "ckpt"}', f'--dst={tmp_path / "hf"}', '--max_shard_size=50KB')
  assert out.startswith('orbax->hf: llama, ')
  assert len([n for n in os.listdir(tmp_path / 'hf') if n.endswith('.safetensors')]) > 2
  reloaded = cls.from_pretrained(str(tmp_path / 'hf'), dtype='auto')
  assert_same_state(reloaded, model, dtype=torch.bfloat16)


def test_errors(hf_model, tmp_path):
  _, _, src = hf_model
  with pytest.raises(SystemExit, match=re.escape(str(tmp_path)) +
                     '.*neither config.json .* nor model_config.json'):
    run_cli(src=str(tmp_path), dst=str(tmp_path / 'out'))
  (tmp_path / 'out').mkdir()
  (tmp_path / 'out' / 'x').write_text('')
  with pytest.raises(SystemExit, match=re.escape(str(tmp_path / 'out')) + '.*overwrite'):
    run_cli(src=src, dst=str(tmp_path / 'out'))
  run_cli(src=src, dst=str(tmp_path / 'out'), overwrite=True)
  assert sorted(os.listdir(tmp_path / 'out')) == [checkpoint.CONFIG_FILE, checkpoint.PARAMS_DIR]

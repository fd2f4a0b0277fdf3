"""notebooks/colab_tpu_quickstart.ipynb runs top to bottom on CPU."""

import json
import os

import jax
import nbclient
import nbformat

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, 'notebooks', 'colab_tpu_quickstart.ipynb')


def test_quickstart_notebook_runs_on_cpu(tmp_path, monkeypatch):
  monkeypatch.setenv('RVLF_NOTEBOOK_WORKDIR', str(tmp_path))
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  # The notebook's launchers run in subprocesses: they share the session's compilation cache
  # (tests/conftest.py), where the tiny recipe's programs usually are already.
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', jax.config.jax_compilation_cache_dir)
  monkeypatch.setenv('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.2')
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=900, kernel_name='python3',
                                   resources={'metadata': {'path': os.path.dirname(NOTEBOOK)}})
  client.execute()  # raises CellExecutionError, with the cell and its traceback, on a failure

  with open(tmp_path / 'run' / 'results.json') as f:
    results = json.load(f)
  assert {'sft', 'grpo'} <= set(results)
  assert {'decoder', 'sign_config.json', 'sign_encoder.safetensors'} <= set(
      os.listdir(tmp_path / 'export'))
  text = '\n'.join(out.get('text', '') for cell in nb.cells if cell.cell_type == 'code'
                   for out in cell.get('outputs', []))
  assert 'hyp: ' in text and 'ref: ' in text  # translations were shown
  assert 'parameters' in text  # the exported decoder loaded with transformers
  images = [out for cell in nb.cells if cell.cell_type == 'code'
            for out in cell.get('outputs', []) if 'image/png' in out.get('data', {})]
  assert images  # the training curves were drawn

"""Test setup: 8 fake CPU devices and fast XLA compiles (set before jax is imported), float32
matmuls at full precision."""

import os

# The suite is mostly compilation of small programs. The legacy CPU emitters compile about 3x
# faster than the fusion emitters, and without LLVM's optimisation passes compiles take another
# 2.5x less (three compile-bound test files: 390 s -> 157 s on 2 cores); the tests' numbers do not
# depend on how the code is emitted (launch.plan's FAST_COMPILE options, as XLA flags).
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8 '
                      '--xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=0')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
os.environ.setdefault('HF_HUB_OFFLINE', '1')

import atexit  # pylint: disable=g-import-not-at-top,g-bad-import-order
import shutil  # pylint: disable=g-import-not-at-top,g-bad-import-order
import tempfile  # pylint: disable=g-import-not-at-top,g-bad-import-order

import jax  # pylint: disable=g-import-not-at-top  (after the environment above)

# A persistent compilation cache for the session: many tests compile the same programs (the
# recipe's steps in several workdirs, the same tiny models in several files), and XLA CPU
# compiles take seconds each; a hit takes ~0.1 s. Fresh per session, so no stale executables.
# Under pytest-xdist (`-n 2`) the workers of one run share it: it is named by the controller's
# process id (the workers' parent), and the controller, which outlives them, removes it.
_SHARED = os.path.join(tempfile.gettempdir(), 'rvlf-jax-cache-{}')
if os.environ.get('PYTEST_XDIST_WORKER'):
  _CACHE = _SHARED.format(os.getppid())
  os.makedirs(_CACHE, exist_ok=True)
else:
  _CACHE = tempfile.mkdtemp(prefix='rvlf-jax-cache-')
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
jax.config.update('jax_compilation_cache_dir', _CACHE)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.2)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


def pytest_sessionfinish(session):
  """The controller of an xdist run removes its workers' shared compilation cache."""
  del session
  if not os.environ.get('PYTEST_XDIST_WORKER'):
    shutil.rmtree(_SHARED.format(os.getpid()), ignore_errors=True)

"""The benchmark harness: FLOP formula, timing, the report writer, and the train/rewards checks."""

import sys
import time
import types

import numpy as np
import pytest

from benchmarks import bench_rewards
from benchmarks import bench_train
from benchmarks import common
from benchmarks import run as run_lib

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def test_train_step_flops_reproduces_the_issue_figure():
  # The issue: HF's step on model M, batch 8 x 256, took 2.60 s at 139 GFLOP/s.
  flops = common.train_step_flops(common.MODEL_M, 8, 256)
  assert flops == pytest.approx(139e9 * 2.60, rel=0.005)
  assert flops == pytest.approx(361.3e9, rel=0.001)


def test_non_embedding_params_counts_the_hf_model():
  import transformers  # pylint: disable=g-import-not-at-top
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, tie_word_embeddings=False))
  total = sum(p.numel() for p in model.parameters())
  embedding = model.model.embed_tokens.weight.numel()
  assert common.non_embedding_params({**TINY}) == total - embedding


def test_gemm_shapes_add_up_to_the_step_flops():
  config, batch, seq = common.MODEL_M, 8, 256
  gemm = sum(count * bench_train._gemm_flops(*spec)
             for _, count, spec in bench_train.gemm_shapes(config, batch, seq))
  d, layers = config['hidden_size'], config['num_hidden_layers']
  norms = 6 * batch * seq * (2 * d * layers + d)  # the formula counts norm scales as parameters
  assert gemm == pytest.approx(common.train_step_flops(config, batch, seq) - norms, rel=1e-12)


def test_time_fn_runs_warmup_then_timed_reps():
  calls = []

  def fn():
    calls.append(time.perf_counter())
    time.sleep(0.001 * len(calls))

  timing = common.time_fn(fn, reps=4, warmup=2)
  assert len(calls) == 6
  assert timing.reps == 4
  assert timing.min <= timing.median <= timing.max
  assert 0.003 <= timing.min < timing.max  # the two warm-up calls (1 and 2 ms) are not timed
  assert 'n=4' in str(timing)
  with pytest.raises(ValueError, match='reps must be >= 1'):
    common.time_fn(fn, reps=0)



def test_mfu_reference_is_the_faster_of_xla_and_blas():
  """On a CPU XLA's GEMM can be slower than BLAS: MFU is against the machine's peak."""
  env = common.measure_env()
  assert env.matmul_gflops_jax > 0 and env.matmul_gflops_blas > 0
  assert env.matmul_gflops == max(env.matmul_gflops_jax, env.matmul_gflops_blas)
  text = run_lib._machine(env)
  assert f'{env.matmul_gflops_blas:.1f} GFLOP/s' in text and "XLA's GEMM" in text

def test_table_formats_floats():
  text = common.table(['a', 'b'], [['x', 1.23456], [2, 'y']])
  assert text.splitlines() == ['| a | b |', '|---|---|', '| x | 1.235 |', '| 2 | y |']


def _fake_env():
  return common.Env(cpu='Fake CPU 9000', cores=2, device='cpu: cpu', matmul_gflops=170.0,
                    bandwidth_gbs=28.0, versions={'python': '3.11', 'jax': '0.0'})


def _module(name, fn):
  module = types.ModuleType(f'benchmarks.{name}')
  module.run = fn
  return module


def test_run_all_writes_the_report_and_survives_a_failing_benchmark(monkeypatch, tmp_path):
  seen = []

  def ok(env, quick):
    seen.append(('ok', env.cpu, quick))
    return common.Section('Fake OK', 'A body with a table.\n\n| x |\n|---|\n| 1 |',
                          {'speed-up': 3.5, 'ms': 12.0})

  def boom(env, quick):
    seen.append(('boom', quick))
    raise RuntimeError('boom at step 3')

  def later(env, quick):
    seen.append(('later', quick))
    return common.Section('Fake later', 'after the failure', {'ratio': 0.5})

  for name, fn in (('fake_ok', ok), ('fake_boom', boom), ('fake_later', later)):
    monkeypatch.setitem(sys.modules, f'benchmarks.{name}', _module(name, fn))
  out = tmp_path / 'BENCHMARKS.md'
  lines = []
  status = run_lib.run_all(['fake_ok', 'fake_missing', 'fake_boom', 'fake_later'], quick=True,
                           out=str(out), command='python -m benchmarks.run --quick',
                           env=_fake_env(), log=lines.append)
  assert status == 1
  assert seen == [('ok', 'Fake CPU 9000', True), ('boom', True), ('later', True)]
  text = out.read_text()
  assert '`python -m benchmarks.run --quick`' in text
  assert 'Fake CPU 9000' in text and '170.0 GFLOP/s' in text and '28.0 GB/s' in text
  assert '| jax | 0.0 |' in text
  assert '## Fake OK' in text and 'A body with a table.' in text
  assert '| fake_ok | speed-up | 3.5 |' in text
  assert 'failed: RuntimeError: boom at step 3' in text
  assert '## Fake later' in text and 'after the failure' in text  # ran after the failure
  assert 'fake_missing' in text and 'module missing' in text
  assert '## GPU' in text and 'not measured' in text and 'no GPU was lent' in text
  assert 'Incomplete' not in text
  assert text.index('## Fake OK') < text.index('## fake_boom') < text.index('## Fake later')
  log = '\n'.join(lines)
  assert 'Traceback' in log and 'boom at step 3' in log
  assert 'benchmarks.fake_missing: no such module' in log


def test_run_all_succeeds_when_all_pass(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, 'benchmarks.fake_ok', _module(
      'fake_ok', lambda env, quick: common.Section('Fine', 'ok', {'x': 1.0})))
  out = tmp_path / 'sub' / 'B.md'
  assert run_lib.run_all(['fake_ok'], quick=False, out=str(out), command='cmd', env=_fake_env(),
                         log=lambda line: None) == 0
  assert '## Fine' in out.read_text()


def test_report_sets_the_machine_speed_against_the_issue_figures():
  env = _fake_env()  # 170 GFLOP/s
  train = run_lib.Result('bench_train', 60.0, common.Section(
      'Training step', 'body', {'HF/PyTorch s/step': 5.2}))
  quick = run_lib.render([train], env, 'python -m benchmarks.run --quick', 'now', 1300.0)
  assert 'dense matmul 170.0 GFLOP/s (the issue: about 179, 0.95x)' in quick
  assert 'HF/PyTorch training step of model M 5.2 s (the issue: 2.60 s' in quick
  assert 'at 0.50x the issue\'s speed' in quick
  assert 'this run took 1300 s, over that.' in quick
  # A full run has no time goal; without bench_train only the matmul peak is compared.
  full = run_lib.render([], env, 'python -m benchmarks.run', 'now', 900.0)
  assert 'dense matmul 170.0 GFLOP/s' in full and 'HF/PyTorch' not in full
  assert 'aims at' not in full
  fast = run_lib.render([train], env, 'python -m benchmarks.run --quick', 'now', 1000.0)
  assert 'this run took 1000 s, within that.' in fast


def test_a_benchmark_returning_no_section_fails(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, 'benchmarks.fake_bad', _module('fake_bad',
                                                                  lambda env, quick: {'x': 1}))
  out = tmp_path / 'B.md'
  assert run_lib.run_all(['fake_bad'], quick=True, out=str(out), command='cmd', env=_fake_env(),
                         log=lambda line: None) == 1
  assert 'not common.Section' in out.read_text()


def test_load_and_command_line():
  assert run_lib.load('no_such_benchmark_module') is None
  assert run_lib.load('bench_rewards') is bench_rewards
  assert run_lib.command_line(['/x/run.py', '--quick', '--only=a,b']) == (
      'python -m benchmarks.run --quick --only=a,b')
  assert set(run_lib.REGISTRY) >= {'bench_train', 'bench_rewards'}


def test_rewards_benchmark_pairs_and_equality_check():
  hyps, refs = bench_rewards.make_pairs(num_refs=6, seed=1)
  assert len(hyps) == 6 * bench_rewards.GROUP and len(refs) == 6
  assert hyps[0] == refs[0] and hyps[7] == '' and hyps[8] == refs[1]
  assert hyps == bench_rewards.make_pairs(num_refs=6, seed=1)[0]  # deterministic
  got = bench_rewards.ours(hyps, refs)
  diffs = bench_rewards.check(hyps, refs, got)
  assert diffs['bleu'] <= 1e-9 and diffs['rouge_l'] <= 1e-9 and diffs['bleu_bit_identical']
  # The rewards spread over the pair kinds: identical pairs score 1, empty ones 0.
  assert got['total'][0] == pytest.approx(1.0) and got['total'][7] == 0.0
  assert 0 < np.median(got['total']) < 1
  bad = dict(got, rouge_l=got['rouge_l'] + 1e-6)
  with pytest.raises(AssertionError, match='rouge_l'):
    bench_rewards.check(hyps, refs, bad)


def test_lcs_dp():
  assert bench_rewards.lcs_dp('a b c d'.split(), 'a c e d f'.split()) == 3
  assert bench_rewards.lcs_dp([], ['a']) == 0


def test_train_step_sides_compute_the_same_loss(monkeypatch, tmp_path):
  monkeypatch.setattr(common, 'CACHE_DIR', str(tmp_path))
  path = common.model_m_dir(**TINY)
  tokens = bench_train.make_tokens(TINY['vocab_size'], batch=2, seq=16)
  assert tokens.shape == (2, 17)
  theirs = bench_train.hf_torch(path, tokens, reps=1, breakdown=False)
  mine = bench_train.ours(path, tokens, reps=1, breakdown=False, profile=True)
  assert mine.loss0 == pytest.approx(theirs.loss0, rel=bench_train.LOSS_RTOL)
  assert mine.loss0 == pytest.approx(np.log(TINY['vocab_size']), rel=0.05)  # random init
  assert mine.cost and mine.cost['flops'] > 0
  assert mine.step.reps == 1 and theirs.step.reps == 1
  if mine.profile is not None:  # the profiler wrote a trace: its operations are the step's
    rows, _, dots, total = bench_train.profile_summary(mine.profile, mine.hlo_ops)
    assert 0 < dots < total
    assert 'MLP' in [r[0] for r in rows]


def test_op_self_times_subtracts_nested_operations():
  events = [
      {'ph': 'M', 'name': 'thread_name', 'pid': 1, 'tid': 1},
      {'ph': 'X', 'name': 'while.3', 'ts': 0, 'dur': 100, 'pid': 1, 'tid': 1},
      {'ph': 'X', 'name': 'ThunkExecutor::Execute', 'ts': 5, 'dur': 90, 'pid': 1, 'tid': 1},
      {'ph': 'X', 'name': 'dot.1', 'ts': 10, 'dur': 30, 'pid': 1, 'tid': 1},
      {'ph': 'X', 'name': 'ynn_fusion.2', 'ts': 50, 'dur': 20, 'pid': 1, 'tid': 1},
      {'ph': 'X', 'name': 'dot.1', 'ts': 200, 'dur': 40, 'pid': 1, 'tid': 2},  # other thread
      {'ph': 'X', 'name': '$profiler.py:1 trace', 'ts': 0, 'dur': 999, 'pid': 1, 'tid': 3},
      {'ph': 'X', 'name': 'end: dot.1', 'ts': 0, 'dur': 5, 'pid': 1, 'tid': 1},
  ]
  times = bench_train.op_self_times(events)
  assert times == pytest.approx({'while.3': 50e-6, 'dot.1': 70e-6, 'ynn_fusion.2': 20e-6})


HLO = """HloModule jit_step

%fused_computation.8 (param_0: f32[4,8], param_1: f32[8,2]) -> f32[4,2] {
  %param_0 = f32[4,8]{1,0} parameter(0)
  %param_1 = f32[8,2]{1,0} parameter(1)
  ROOT %dot.0 = f32[4,2]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_computation.9 (param_0: f32[4,2]) -> f32[4,2] {
  %param_0 = f32[4,2]{1,0} parameter(0)
  ROOT %exponential.1 = f32[4,2]{1,0} exponential(%param_0)
}

ENTRY %main.1 (Arg_0: f32[4,8], Arg_1: f32[8,2]) -> f32[4,2] {
  %Arg_0 = f32[4,8]{1,0} parameter(0)
  %Arg_1 = f32[8,2]{1,0} parameter(1)
  %ynn_fusion.8 = f32[4,2]{1,0} fusion(%Arg_0, %Arg_1), kind=kCustom, calls=%fused_computation.8, metadata={op_name="jit(step)/jvp(Decoder)/transformer/while/body/closed_call/layers/mlp/up_proj/dot_general"}
  %dot.5 = f32[2,8]{1,0} dot(%ynn_fusion.8, %Arg_0), metadata={op_name="jit(step)/transpose(jvp(Decoder))/Decoder.logits/lm_head/transpose"}
  ROOT %exp_fusion.2 = f32[4,2]{1,0} fusion(%ynn_fusion.8), kind=kLoop, calls=%fused_computation.9, metadata={op_name="jit(step)/transpose(jvp(Decoder))/transformer/layers_3/attn/vmap()/exp"}
}
"""


def test_hlo_op_info_and_profile_summary():
  info = bench_train.hlo_op_info(HLO)
  assert info['ynn_fusion.8'][0] and info['dot.5'][0] and not info['exp_fusion.2'][0]
  assert info['dot.5'][1].endswith('lm_head/transpose')
  profile = {'ynn_fusion.8': 2.0, 'dot.5': 1.0, 'exp_fusion.2': 0.5, 'copy.1': 0.25}
  rows, top, dots, total = bench_train.profile_summary(profile, info)
  assert (dots, total) == (3.0, 3.75)
  assert rows[0] == ['MLP', 2.0, 0.0]
  assert ['lm_head', 1.0, 0.0] in rows
  assert ['attention core (rope, q k^T, softmax, p v)', 0.0, 0.5] in rows
  assert ['optimizer (AdamW) and the rest', 0.0, 0.25] in rows
  assert top[0] == ['exp_fusion', 'bwd: layers_*/attn/vmap()/exp', 0.5]



def test_ours_with_xla_flags_runs_in_a_subprocess(monkeypatch, tmp_path):
  monkeypatch.setattr(common, 'CACHE_DIR', str(tmp_path))
  path = common.model_m_dir(**TINY)
  m = bench_train.ours_with_xla_flags(path, '--xla_cpu_use_fusion_emitters=false', 1,
                                      name='legacy emitters', batch=2, seq=16, scan_layers=False)
  assert m.name == 'legacy emitters' and m.step.reps == 1 and m.compile_seconds > 0
  # The same batch as in this process: the loss of the model at initialisation.
  assert m.loss0 == pytest.approx(np.log(TINY['vocab_size']), rel=0.05)
  with pytest.raises(RuntimeError, match='the subprocess with XLA_FLAGS'):
    bench_train.ours_with_xla_flags(str(tmp_path / 'missing'), '', 1, name='bad')


def test_train_section_reports_goal_limits_and_variants():
  env = _fake_env()
  flops = common.train_step_flops(common.MODEL_M, 8, 256)
  t = lambda s: common.Timing(s, s * 0.9, s * 1.1, 5)
  theirs = bench_train.Measured('HF transformers / PyTorch', t(2.6), 9.0908, t(0.8), t(2.4))
  profile = {'ynn_fusion.8': 2.0, 'dot.5': 1.0, 'exp_fusion.2': 0.5}
  mine = bench_train.Measured('ours (default: scan_layers=True)', t(4.0), 9.0908, t(0.9), t(2.8),
                              20.0, {'flops': 9e10, 'bytes accessed': 6e9},
                              profile, bench_train.hlo_op_info(HLO))
  unrolled = bench_train.Measured('ours (scan_layers=False (unrolled layers))', t(3.5), 9.0908,
                                  compile_seconds=15.0, cost={'flops': 3.6e11})
  floor = [(name, count, bench_train._gemm_flops(*spec), t(0.01))
           for name, count, spec in bench_train.gemm_shapes(common.MODEL_M, 8, 256)]
  section = bench_train._section(env, flops, theirs, [mine, unrolled], floor, floor, 5)
  text = section.markdown
  assert '**Goal >= 80% MFU: missed** by 19.3 points' in text
  assert 'the best of our variants, ours (scan_layers=False (unrolled layers))' in text
  assert section.figures['ours s/step'] == 4.0 and section.figures['HF/PyTorch s/step'] == 2.6
  assert section.figures['speed-up vs HF/PyTorch'] == pytest.approx(2.6 / 4.0)
  assert section.figures['best variant MFU'] == pytest.approx(flops / 3.5 / 1e9 / 170.0)
  assert 'What bounds it' in text and 'jax.profiler' in text and 'lm_head' in text
  assert 'XLA cost analysis of ours (default: scan_layers=True): 90.0 GFLOP' in text
  fast = bench_train.Measured('ours (fast)', t(1.0), 9.0908)
  section = bench_train._section(env, flops, theirs, [mine, fast], floor, floor, 5)
  assert '**Goal >= 80% MFU: met** by ours (fast)' in section.markdown

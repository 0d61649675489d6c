"""The bench command: its JSON output and its errors (no timing is asserted: timings are noisy;
the benchmarks measure, the tests check what they report)."""

import json
import math
import pathlib

import pytest

from heterrec_jax import bench, run as run_lib
from heterrec_jax.config import load_config

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = str(ROOT / 'configs' / 'tiny.py')


@pytest.fixture(scope='module')
def tiny_data(tmp_path_factory):
  cfg = load_config(TINY)
  return run_lib.load_dataset(cfg, tmp_path_factory.mktemp('bench-data'), progress=False).path


def _last_json(capsys):
  return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_bench_train_reports_cost_memory_and_host_overhead(tiny_data, capsys):
  assert bench.main(['train', '--config', TINY, '--steps', '2', '--warmup', '1',
                     f'data.path={tiny_data}']) == 0
  result = _last_json(capsys)
  assert result['benchmark'] == 'train' and result['batch_size'] == 16
  for key in ('compile_s', 'step_time_s', 'flops_per_step', 'matmul_ceiling_flops_per_s',
              'peak_memory_bytes'):
    assert math.isfinite(result[key]) and result[key] > 0, key
  assert result['sequences_per_s'] == pytest.approx(16 / result['step_time_s'])
  assert result['minor_page_faults_per_step'] >= 0
  assert result['system_cpu_fraction'] is None or 0.0 <= result['system_cpu_fraction'] <= 1.0
  assert result['attention'] == 'auto' and result['compute_dtype'] == 'float32'
  assert result['dense_peak_memory_bytes'] > 0 and result['xla_flops_per_step'] > 0
  # on the suite's 8 devices XLA counts one device's part; flops_per_step is the whole step's
  assert result['devices'] == 8
  assert result['flops_per_step'] > 4 * result['xla_flops_per_step']
  # a Python process with JAX holds 100s of MB: KiB read as bytes (or the reverse) is 1024x off
  assert 50e6 < result['peak_resident_bytes'] < 64e9
  assert result['host_allocator'] in ('system', 'reuse')
  # one warm-up step, then rounds of 2 until the page faults stop falling (at most 1 + 6)
  assert result['warmup_steps'] in (1, 3, 5, 7, 9, 11, 13)


def test_bench_train_settle_zero_times_one_round(tiny_data, capsys):
  assert bench.main(['train', '--config', TINY, '--steps', '1', '--warmup', '2', '--settle', '0',
                     f'data.path={tiny_data}']) == 0
  assert _last_json(capsys)['warmup_steps'] == 2


@pytest.mark.parametrize('faults,first,max_more,rounds', [
    ([18_000, 0, 0], 400_000, 3, 2),            # 'reuse': the heap grows, then stays put
    ([180_000, 184_000, 0], 900_000, 3, 2),     # 'system': the same pages every step
    ([0, 0], 900_000, 3, 1),                    # settled during the warm-up
    ([1e5, 1e4, 1e3, 1e2, 10, 1], 1e6, 3, 4),   # still falling: the cap, 1 + 3 rounds
    ([1e5, 1e4], 1e6, 0, 1),                    # --settle 0: one round
    ([5.0, 4.6, 4.0, 0.0], 10.0, 5, 2),         # 4.6 >= 0.9 x 5: not 10% fewer
    ([(3e4, True), (3e4, True), 0], 3e4, 3, 3),  # a heap growing steadily: on until it stops
    ([(3e4, True)] * 6, 3e4, 3, 4),             # ... or the cap
])
def test_settle_stops_when_the_page_faults_stop_falling(faults, first, max_more, rounds):
  calls = iter(f if isinstance(f, tuple) else (f, False) for f in faults)
  assert bench.settle(lambda: next(calls), first, max_more) == rounds


def test_bench_train_sweep(tiny_data, capsys, tmp_path):
  """--max-len x --dtypes x --attention x --microbatches: one run each in one process, a table
  and one JSON. In 2 parts, flops_per_step stays the whole batch's (XLA counts the parts' loop
  body once: its own count is lower). --trace: a profiler trace per run, in its own folder."""
  assert bench.main(['train', '--config', TINY, '--steps', '1', '--warmup', '1', '--max-len',
                     '4,8', '--dtypes', 'bfloat16', '--attention', 'dense', '--microbatches', '2',
                     '--trace', str(tmp_path / 'trace'), f'data.path={tiny_data}']) == 0
  out = capsys.readouterr().out
  result = json.loads(out.strip().splitlines()[-1])
  assert result['benchmark'] == 'train_sweep'
  runs = [(r['max_len'], r['compute_dtype'], r['attention'], r['microbatches'])
          for r in result['runs']]
  assert runs == [(4, 'bfloat16', 'dense', 2), (8, 'bfloat16', 'dense', 2)]
  assert all(r['flops_per_step'] > 1.2 * r['xla_flops_per_step'] for r in result['runs'])
  assert '| dense | default | bfloat16 | 2 | 8 |' in out
  for i, r in enumerate(result['runs']):
    assert r['trace_dir'] == str(tmp_path / 'trace' / f'run{i}')
    assert list(pathlib.Path(r['trace_dir']).rglob('*.xplane.pb')), r['trace_dir']


def test_bench_train_block_items_reach_the_traced_step(tiny_data, capsys):
  """--block-items: one run per block size; the blockwise program's loop body (what XLA counts)
  grows with the block, so the setting reached the traced step; the dense FLOPs do not move."""
  assert bench.main(['train', '--config', TINY, '--steps', '1', '--warmup', '1', '--attention',
                     'blockwise', '--block-items', '2,4', f'data.path={tiny_data}']) == 0
  runs = _last_json(capsys)['runs']
  assert [r['block_items'] for r in runs] == [2, 4]
  assert runs[0]['xla_flops_per_step'] < runs[1]['xla_flops_per_step']
  assert runs[0]['flops_per_step'] == runs[1]['flops_per_step']


def test_bench_ceiling_reports_each_dtype_and_precision(capsys):
  assert bench.main(['ceiling', '--n', '64', '--repeats', '2', '--dtypes', 'float32,bfloat16',
                     '--precisions', 'default,highest', '--statistic', 'median']) == 0
  result = _last_json(capsys)
  assert result['benchmark'] == 'ceiling' and result['statistic'] == 'median'
  for key in ('float32_default', 'float32_highest', 'bfloat16_default', 'bfloat16_highest'):
    assert math.isfinite(result[f'{key}_flops_per_s']) and result[f'{key}_flops_per_s'] > 0


def test_bench_train_profile(tiny_data, capsys):
  assert bench.main(['train', '--config', TINY, '--steps', '1', '--warmup', '1', '--profile',
                     '--attention', 'blockwise', f'data.path={tiny_data}']) == 0
  profile = _last_json(capsys)['profile']
  for name in ('forward_backward', 'loss', 'embeddings', 'token_attention', 'item_blocks',
               'optimizer'):
    assert profile[name]['time_s'] > 0 and profile[name]['calls'] >= 1, name
  assert profile['token_layer_norm']['calls'] == 2 * load_config(TINY).model.n1
  # The attention core is the blockwise program (a loop), not the dense one.
  assert profile['token_attention']['flops'] < profile['token_blocks']['flops']


def test_bench_train_profile_of_a_baseline(tiny_data, capsys):
  """A baseline's step: its generic parts only, no traceback. BERT4Rec (its outputs hold a
  boolean mask); PinnerFormer (an HTFL, not HeterRec's levels) raised the same way and takes
  the same path, `isinstance(model, HeterRec)`; one model keeps the suite's time down."""
  assert bench.main(['train', '--config', TINY, '--steps', '1', '--warmup', '1', '--profile',
                     'model.name=bert4rec', f'data.path={tiny_data}']) == 0
  profile = _last_json(capsys)['profile']
  assert set(profile) == {'forward_backward', 'forward', 'loss', 'optimizer'}
  assert all(p['time_s'] > 0 for p in profile.values())


def test_bench_data_reports_windows_per_second(tiny_data, capsys):
  assert bench.main(['data', '--input', str(tiny_data), '--max-len', '6', '--batch-size', '8',
                     '--batches', '3', '--warmup', '1']) == 0
  result = _last_json(capsys)
  assert result['windows_per_s'] == pytest.approx(3 * 8 / result['seconds'])
  assert (result['batches'], result['max_len'], result['n_step']) == (3, 6, 3)


@pytest.mark.parametrize('argv', [
    ['train', '--config', TINY, '--steps', '0'],
    ['train', '--config', TINY, 'model.heads=3'],
    ['train', '--config', TINY, '--attention', 'flash'],
    ['train', '--config', TINY, '--block-items', '0'],
    ['train', '--config', TINY, '--settle', '-1'],
    ['ceiling', '--dtypes', 'float33'],
    ['ceiling', '--precisions', 'exact'],
    ['ceiling', '--repeats', '0'],
    ['train', '--config', TINY, '--trace', __file__],
    ['data', '--input', '/nonexistent/folder'],
    ['data', '--input', '.', '--batches', '0'],
])
def test_bench_bad_input_is_one_clear_error(argv, capsys):
  assert bench.main(argv) == 2
  assert capsys.readouterr().err.startswith('error: ')

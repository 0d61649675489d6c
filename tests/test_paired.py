"""`experiments paired`: per-user values over runs, the paired bootstrap against a loop, the
command's table, JSON and its errors (on fake ranks; test_train runs it on a trained run)."""

import json
import math

import numpy as np
import pytest

from heterrec_jax import metrics
from heterrec_jax.experiments import cli, paired


def reference_bootstrap(a_U, b_U, resamples, seed, level):
  """One resample at a time: the r-th draw of the users, both sides' means, their ratio."""
  rng = np.random.default_rng(seed)
  relative, ahead = [], []
  for _ in range(resamples):
    users = rng.integers(0, len(a_U), size=len(a_U))
    mean_a = sum(a_U[u] for u in users) / len(users)
    mean_b = sum(b_U[u] for u in users) / len(users)
    relative.append(mean_a / mean_b - 1.0)
    ahead.append(mean_a > mean_b)
  relative = sorted(relative)
  tail = (1.0 - level) / 2.0

  def quantile(q):  # numpy's default: linear between the order statistics
    pos = q * (len(relative) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(relative) - 1)
    return relative[lo] + (pos - lo) * (relative[hi] - relative[lo])

  return (sum(a_U) / sum(b_U) - 1.0, quantile(tail), quantile(1.0 - tail),
          sum(ahead) / resamples)


@pytest.mark.parametrize('resamples,level', [(300, 0.95), (37, 0.8)])  # 300: two chunks
def test_bootstrap_matches_the_loop_reference(resamples, level):
  rng = np.random.default_rng(0)
  a_U, b_U = rng.random(53), rng.random(53) + 0.05
  got = paired.paired_bootstrap(a_U, b_U, resamples, seed=7, level=level)
  relative, low, high, ahead = reference_bootstrap(a_U, b_U, resamples, 7, level)
  np.testing.assert_allclose([got.relative, got.low, got.high, got.a_ahead],
                             [relative, low, high, ahead], rtol=1e-9)
  np.testing.assert_allclose([got.a, got.b], [a_U.mean(), b_U.mean()])
  assert got.low <= got.relative <= got.high


def test_identical_sides_differ_by_nothing_and_a_ratio_over_zero_is_undefined():
  hits_U = (np.arange(40) % 3 == 0).astype(float)
  same = paired.paired_bootstrap(hits_U, hits_U, 100)
  assert (same.relative, same.low, same.high, same.a_ahead) == (0.0, 0.0, 0.0, 0.0)
  undefined = paired.paired_bootstrap(hits_U, np.zeros(40), 100)
  assert math.isnan(undefined.relative) and math.isnan(undefined.low)
  # Some resamples miss every hit of side B: the interval holds an undefined ratio.
  sparse_U = np.zeros(40)
  sparse_U[0] = 1.0
  assert math.isnan(paired.paired_bootstrap(hits_U, sparse_U, 200).high)


@pytest.mark.parametrize('a,b,resamples,level,match', [
    (np.ones(3), np.ones(4), 10, 0.95, 'same users'),
    (np.ones((2, 3)), np.ones((2, 3)), 10, 0.95, 'same users'),
    (np.ones(3), np.ones(3), 0, 0.95, 'resamples=0'),
    (np.ones(3), np.ones(3), 10, 1.0, 'level=1.0'),
])
def test_bad_bootstrap_arguments(a, b, resamples, level, match):
  with pytest.raises(ValueError, match=match):
    paired.paired_bootstrap(a, b, resamples, level=level)


def test_user_values_average_each_users_metric_over_the_runs():
  rank_RU = np.array([[0, 12, 60, 3], [20, 1, 60, 3], [5, 9, 40, 100]])
  values = paired.user_values(rank_RU)
  for u in range(4):
    for name in ('recall@10', 'ndcg@50', 'mrr'):
      per_run = [float(metrics.per_row(np.array([r]))[name][0]) for r in rank_RU[:, u]]
      np.testing.assert_allclose(values[name][u], np.mean(per_run), rtol=1e-6)
  with pytest.raises(ValueError, match='runs >= 1'):
    paired.user_values(np.zeros(4))


@pytest.fixture
def fake_runs(monkeypatch):
  """Workdir names map to fixed ranks: 'good*' ranks every target higher than 'bad*'; 'other'
  holds other users' targets."""
  rng = np.random.default_rng(0)
  target_U = np.arange(60)
  ranks = {'good0': rng.integers(0, 20, 60), 'good1': rng.integers(0, 20, 60),
           'bad0': rng.integers(30, 400, 60), 'other': rng.integers(0, 20, 50)}

  def restore_run(workdir, checkpoint):
    if workdir.name not in ranks:
      raise FileNotFoundError(f'no checkpoint in {workdir}/best or checkpoints')
    return workdir.name

  def target_ranks(name, split):
    return ranks[name], (target_U[:50] + 1 if name == 'other' else target_U)

  monkeypatch.setattr(paired.run_lib, 'restore_run', restore_run)
  monkeypatch.setattr(paired.evaluate, 'target_ranks', target_ranks)


def test_command_prints_the_table_and_writes_json(fake_runs, tmp_path, capsys):
  out = tmp_path / 'sub' / 'paired.json'
  assert cli.main(['paired', '--a', 'good0', 'good1', '--b', 'bad0', '--labels', 'new,old',
                   '--resamples', '500', '--quiet', '--out', str(out)]) == 0
  text = capsys.readouterr().out
  assert '| metric | new | old | new vs old |' in text and '60 users' in text
  written = json.loads(out.read_text())
  assert written['labels'] == ['new', 'old'] and written['resamples'] == 500
  recall = written['metrics']['recall@10']
  assert recall['b'] == 0.0 and recall['relative'] is None  # side B never hits the top 10
  mrr = written['metrics']['mrr']
  assert mrr['a_ahead'] == 1.0 and mrr['low'] > 0.0


@pytest.mark.parametrize('argv,match', [
    (['--a', 'good0', '--b', 'other'], 'other test targets'),
    (['--a', 'good0', 'other', '--b', 'bad0'], 'other test targets'),
    (['--a', 'good0', '--b', 'missing'], 'no checkpoint in missing'),
    (['--a', 'good0', '--b', 'bad0', '--labels', 'one'], '--labels takes two names'),
    (['--a', 'good0', '--b', 'bad0', '--resamples', '0'], '--resamples=0'),
    (['--a', 'good0', '--b', 'bad0', '--level', '95'], '--level=95'),
])
def test_bad_commands_are_one_line_errors(fake_runs, capsys, argv, match):
  assert cli.main(['paired', '--quiet'] + argv) == 2
  err = capsys.readouterr().err
  assert match in err and err.startswith('error: ') and 'Traceback' not in err


def test_out_that_is_a_folder_is_refused_before_ranking(fake_runs, tmp_path, capsys):
  assert cli.main(['paired', '--a', 'good0', '--b', 'bad0', '--out', str(tmp_path)]) == 2
  assert 'is a folder' in capsys.readouterr().err


def test_paired_takes_no_overrides(capsys):
  with pytest.raises(SystemExit):
    cli.main(['paired', 'model.d_f=8', '--a', 'x', '--b', 'y'])
  assert 'takes no overrides' in capsys.readouterr().err


def test_more_than_one_process_is_refused(fake_runs, monkeypatch, capsys):
  monkeypatch.setattr(paired.jax, 'process_count', lambda: 2)
  assert cli.main(['paired', '--a', 'good0', '--b', 'bad0']) == 2
  assert 'run it in one process (this job has 2)' in capsys.readouterr().err

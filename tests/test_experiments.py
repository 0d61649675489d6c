"""Experiment sweeps: plans, gathering fake results.json into tables, the scaling plot.

Nothing here trains a model: runs are fake folders written in tmp_path, and the execution path
is driven through a stand-in for `train.train`.
"""

import dataclasses
import json
import os
import pathlib
import shlex

import numpy as np
import pytest

from heterrec_jax import experiments as ex
from heterrec_jax import flops
from heterrec_jax import train as train_lib
from heterrec_jax.config import METRIC_NAMES, apply_overrides, load_config
from heterrec_jax.experiments import gather, runner, scaling, sweep, tables

ROOT = pathlib.Path(__file__).resolve().parent.parent
BASELINES = ('sasrec', 'bert4rec', 'pinnerformer', 'hstu')


def _train_command(config, workdir, overrides):
  return shlex.join(['python', '-m', 'heterrec_jax.train', '--config', config,
                     '--workdir', str(workdir), *overrides])


def _plan(out):
  return (out / 'plan.txt').read_text().splitlines()


def _overrides_of(line):
  """The dotted overrides of a planned train command, as the train CLI would read them."""
  words = shlex.split(line)
  assert words[:3] == ['python', '-m', 'heterrec_jax.train']
  return words[7:]


def test_compare_plan_only_writes_exact_commands(tmp_path):
  out = tmp_path / 'out'
  rc = ex.main(['compare', '--data', 'data/ml100k', '--config', 'configs/ml100k.py',
                '--models', 'heterrec,sasrec,popularity,hstu', '--seeds', '2', '--out', str(out),
                'model.d_f=32', '--steps', '50', '--plan-only', 'model.d_k=32'])
  assert rc == 0
  expected = [_train_command('configs/ml100k.py', out / 'runs' / f'{m}-seed{s}',
                             [f'model.name={m}', f'train.seed={s}', 'data.path=data/ml100k',
                              'train.steps=50', 'model.d_f=32', 'model.d_k=32'])
              for m in ('heterrec', 'sasrec', 'hstu') for s in (0, 1)]
  assert _plan(out) == expected
  assert [p.name for p in out.iterdir()] == ['plan.txt']  # nothing else was done
  for line in expected:  # every command is a valid train command line
    cfg = apply_overrides(load_config(str(ROOT / 'configs' / 'ml100k.py')), _overrides_of(line))
    assert (cfg.data.path, cfg.train.steps, cfg.model.d_f, cfg.model.d_k) == (
        'data/ml100k', 50, 32, 32)


def test_compare_model_config_gives_a_row_its_own_config(tmp_path):
  out = tmp_path / 'out'
  rc = ex.main(['compare', '--config', 'configs/ml100k.py', '--models', 'heterrec,sasrec',
                '--model-config', 'sasrec=configs/ml100k_sasrec.py', '--seeds', '1',
                '--out', str(out), '--plan-only'])
  assert rc == 0
  assert _plan(out) == [
      _train_command('configs/ml100k.py', out / 'runs' / 'heterrec-seed0',
                     ['model.name=heterrec', 'train.seed=0']),
      _train_command('configs/ml100k_sasrec.py', out / 'runs' / 'sasrec-seed0',
                     ['model.name=sasrec', 'train.seed=0'])]


@pytest.mark.parametrize('flags,match', [
    (['--model-config', 'sasrec'], 'NAME=CONFIG_FILE'),
    (['--model-config', 'bert4rec=configs/ml100k_bert4rec.py'], 'not a trained row'),
    (['--model-config', 'sasrec=configs/missing.py'], 'does not exist'),
    (['--variants', 'full', '--model-config', 'sasrec=configs/ml100k_sasrec.py'], 'ablation'),
])
def test_compare_bad_model_config(tmp_path, capsys, flags, match):
  models = [] if '--variants' in flags else ['--models', 'heterrec,sasrec']
  rc = ex.main(['compare', '--out', str(tmp_path / 'out'), '--plan-only', *models, *flags])
  assert rc == 2
  assert match in capsys.readouterr().err
  assert not (tmp_path / 'out').exists()


def test_compare_plan_default_models_runs_models_times_seeds(tmp_path):
  assert ex.main(['compare', '--out', str(tmp_path), '--seeds', '3', '--plan-only']) == 0
  lines = _plan(tmp_path)
  assert len(lines) == 5 * 3  # popularity is not trained
  assert not any('popularity' in line for line in lines)
  names = [shlex.split(line)[6] for line in lines]
  assert names[:3] == [str(tmp_path / 'runs' / f'heterrec-seed{s}') for s in range(3)]


def test_ablation_plan_sets_the_variant(tmp_path):
  rc = ex.main(['compare', '--variants', 'full,no_htfl,no_tlmp', '--seeds', '2', '--data', 'D',
                '--out', str(tmp_path), '--plan-only'])
  assert rc == 0
  expected = [_train_command('configs/default.py', tmp_path / 'runs' / f'heterrec-{v}-seed{s}',
                             ['model.name=heterrec', f'model.variant={v}', f'train.seed={s}',
                              'data.path=D'])
              for v in ('full', 'no_htfl', 'no_tlmp') for s in (0, 1)]
  assert _plan(tmp_path) == expected


def test_option_ablation_rows_switch_one_option_of_the_config_off(tmp_path):
  rc = ex.main(['compare', '--config', 'configs/ml100k.py', '--variants',
                'full,no_id_vector,no_positions,no_smoothing,no_seen_bias', '--seeds', '1',
                '--out', str(tmp_path), '--plan-only', 'train.steps=7'])
  assert rc == 0
  off = {'full': [], 'no_id_vector': ['model.item_id_vector=false'],
         'no_positions': ['model.item_positions=false'],
         'no_smoothing': ['loss.label_smoothing=0'], 'no_seen_bias': ['model.seen_bias=false']}
  expected = [_train_command('configs/ml100k.py', tmp_path / 'runs' / f'heterrec-{v}-seed0',
                             ['model.name=heterrec', 'model.variant=full', *o, 'train.seed=0',
                              'train.steps=7'])
              for v, o in off.items()]
  assert _plan(tmp_path) == expected
  base = load_config(str(ROOT / 'configs' / 'ml100k.py'))
  assert base.model.item_id_vector and base.model.item_positions and base.loss.label_smoothing
  assert base.model.seen_bias
  configs = {v: apply_overrides(base, _overrides_of(line)) for v, line in zip(off, expected)}
  for v, cfg in configs.items():  # each row differs from the full model in its option alone
    changed = {f'{group}.{name}'
               for group in ('data', 'model', 'loss', 'optim', 'train', 'eval')
               for name, value in dataclasses.asdict(getattr(cfg, group)).items()
               if value != dataclasses.asdict(getattr(configs['full'], group))[name]}
    assert changed == ({sweep.OPTION_ABLATIONS[v][0]} if v != 'full' else set())


@pytest.mark.parametrize('argv,match', [
    # the default config has no free vector: the row would be the full model again
    (['--variants', 'full,no_id_vector'], 'model.item_id_vector=false already'),
    (['--config', 'configs/ml100k.py', '--variants', 'full,no_positions',
      'model.item_positions=true'], 'the sweep sets model.item_positions itself'),
    (['--config', 'configs/ml100k.py', '--variants', 'full,no_smoothing',
      '--tune', 'loss.label_smoothing=0.1,0.2'], 'switches loss.label_smoothing off itself'),
    (['--variants', 'full,no_dropout'], "'no_dropout' is not allowed"),
])
def test_bad_option_ablation_rows_fail_before_anything_is_written(tmp_path, capsys, argv, match):
  assert ex.main(['compare', '--out', str(tmp_path / 'o'), '--plan-only', *argv]) == 2
  assert match in capsys.readouterr().err
  assert not (tmp_path / 'o').exists()


def test_scaling_plan_covers_the_grid_for_both_variants(tmp_path):
  rc = ex.main(['scaling', '--data', 'D', '--grid', '1x1,2x3', '--out', str(tmp_path),
                '--plan-only'])
  assert rc == 0
  expected = [_train_command('configs/default.py', tmp_path / 'runs' / f'{v}-{a}x{b}-seed0',
                             ['model.name=heterrec', f'model.variant={v}', f'model.n1={a}',
                              f'model.n2={b}', 'train.seed=0', 'data.path=D'])
              for v in ('full', 'no_htfl') for a, b in ((1, 1), (2, 3))]
  assert _plan(tmp_path) == expected


@pytest.mark.parametrize('argv', [
    ['compare', '--models', 'heterrec,nope'],
    ['compare', '--models', 'heterrec', '--variants', 'full'],
    ['compare', 'model.name=sasrec'],
    ['compare', 'train.seed=3'],
    ['compare', '--seeds', '0'],
    ['compare', 'model.d_f=33'],  # checked against the config before anything is written
    ['scaling', '--grid', '2by2'],
    ['scaling', 'model.n1=3'],
    ['compare', '--tune', 'loss.tau=0.1'],  # one value: nothing to choose
    ['compare', '--tune', 'loss.tau'],
    ['compare', '--tune', 'train.steps=10,20'],  # the budget is the same for every row
    ['compare', '--tune', 'loss.tau=0.1,0.2', 'loss.tau=0.3'],
    ['compare', '--tune', 'loss.tau=0.1,-1'],  # a value the config refuses
    ['compare', '--tune', 'loss.tua=0.1,0.2'],
])
def test_bad_sweeps_fail_early_with_a_message(tmp_path, capsys, argv):
  assert ex.main(argv[:1] + ['--out', str(tmp_path / 'o'), '--plan-only'] + argv[1:]) == 2
  assert capsys.readouterr().err.startswith('error: ')
  assert not (tmp_path / 'o' / 'plan.txt').exists()


# ---- gathering ------------------------------------------------------------------------------

def _write_run(out, name, test, valid=None, **files):
  run = out / 'runs' / name
  run.mkdir(parents=True, exist_ok=True)
  (run / 'results.json').write_text(json.dumps({'valid': valid or test, 'test': test}))
  for file, data in files.items():
    (run / f'{file}.json').write_text(json.dumps(data))
  return run


def _random_metrics(rng, base):
  return {k: float(base + rng.uniform(0, 0.05)) for k in METRIC_NAMES}


@pytest.fixture
def fake_compare(tmp_path):
  """Fake runs of a 3-seed comparison: pinnerformer never ran, hstu's seed 2 is missing."""
  rng = np.random.default_rng(0)
  out, values = tmp_path / 'cmp', {}
  for model, base in (('heterrec', 0.30), ('sasrec', 0.20), ('bert4rec', 0.22), ('hstu', 0.26)):
    for seed in range(3):
      if (model, seed) != ('hstu', 2):
        values.setdefault(model, []).append(_random_metrics(rng, base))
        _write_run(out, f'{model}-seed{seed}', values[model][-1], wall_time={'seconds': 10 + seed})
  floor = {k: 0.05 for k in METRIC_NAMES}
  (out / 'runs' / 'sasrec-seed1' / 'popularity.json').write_text(
      json.dumps({'valid': floor, 'test': floor}))
  values['popularity'] = [floor]
  return out, values


def _gather(out, *extra):
  return ex.main(['compare', '--out', str(out), '--config', 'configs/tiny.py', '--gather',
                  '--seeds', '3', *extra])


def test_gather_means_stds_best_baseline_and_gain(fake_compare):
  out, values = fake_compare
  assert _gather(out) == 0
  table = json.loads((out / 'table.json').read_text())
  for model, runs in values.items():
    for column in tables.COLUMNS:
      xs = np.array([r[column] for r in runs])
      stat = table['rows'][model][column]
      np.testing.assert_allclose(stat['mean'], xs.mean(), rtol=1e-12)
      np.testing.assert_allclose(stat['std'], xs.std(ddof=1) if len(xs) > 1 else 0.0, atol=1e-12)
      assert stat['n'] == len(xs)
  for column in tables.COLUMNS:
    means = {m: np.mean([r[column] for r in runs]) for m, runs in values.items() if m != 'heterrec'}
    best = max(means, key=means.get)
    assert table['best_baseline'][column] == {'row': best, 'mean': pytest.approx(means[best])}
    mine = np.mean([r[column] for r in values['heterrec']])
    assert table['gain_percent'][column] == pytest.approx((mine - means[best]) / means[best] * 100)
  assert table['missing'] == ['pinnerformer-seed0', 'pinnerformer-seed1', 'pinnerformer-seed2',
                              'hstu-seed2']
  assert table['seeds']['hstu'] == [0, 1]
  assert table['wall_time_s']['heterrec']['mean'] == pytest.approx(11.0)


def test_table_markdown_layout(fake_compare):
  out, _ = fake_compare
  assert _gather(out) == 0
  lines = (out / 'table.md').read_text().splitlines()
  header = ('| Method | Recall@10 | Recall@50 | Recall@100 | Recall@200 | nDCG@10 | nDCG@50 | '
            'nDCG@100 | nDCG@200 | MRR | n |')
  start = lines.index(header)
  rows = [line.split(' | ')[0].lstrip('| ') for line in lines[start + 2:start + 9]]
  assert rows == ['SASRec', 'BERT4Rec', 'HSTU', 'Popularity', 'HeterRec (ours)',
                  'Best baseline', 'Improvement']
  for line in lines[start:start + 9]:
    assert line.count('|') == len(tables.COLUMNS) + 3
  table = json.loads((out / 'table.json').read_text())
  improvement = lines[start + 8].split(' | ')[1:-1]
  assert improvement == [f'{table["gain_percent"][c]:+.2f}%' for c in tables.COLUMNS]
  assert lines[start + 7].split(' | ')[1] == 'HSTU'
  assert any(line.startswith('Missing runs') and 'pinnerformer-seed0' in line for line in lines)


def _write_reference(folder, seed, test, valid=None, wall=None):
  """A results.json as launch/recbole_reference.py writes it (RecBole's MRR@10 among them)."""
  folder.mkdir(parents=True)
  record = {'seed': seed, 'best_valid': valid or test, 'test': {**test, 'mrr@10': 0.9}}
  if wall is not None:
    record['wall_seconds'] = wall
  (folder / 'results.json').write_text(json.dumps(record))


def test_reference_rows_are_gathered_and_count_as_baselines(fake_compare, tmp_path):
  out, values = fake_compare
  rng = np.random.default_rng(1)
  runs = [{k: float(0.5 + rng.uniform(0, 0.05)) for k in ('recall@10', 'recall@50', 'ndcg@10')}
          for _ in range(2)]
  for seed, metrics in zip((2020, 2021), runs):
    _write_reference(tmp_path / 'rb' / f'seed{seed}', seed, metrics, wall=100.0 + seed)
  assert _gather(out, '--reference', f'RecBole SASRec={tmp_path}/rb/seed*/results.json') == 0
  table = json.loads((out / 'table.json').read_text())
  row = table['rows']['RecBole SASRec']
  assert sorted(row) == ['ndcg@10', 'recall@10', 'recall@50']  # RecBole's mrr@10 is not ours
  for column in row:
    xs = np.array([r[column] for r in runs])
    assert row[column]['mean'] == pytest.approx(xs.mean())
    assert row[column]['std'] == pytest.approx(xs.std(ddof=1))
  assert table['seeds']['RecBole SASRec'] == [2020, 2021]
  assert table['best_baseline']['recall@50']['row'] == 'RecBole SASRec'
  mine = np.mean([r['recall@50'] for r in values['heterrec']])
  theirs = np.mean([r['recall@50'] for r in runs])
  assert table['gain_percent']['recall@50'] == pytest.approx((mine - theirs) / theirs * 100)
  assert table['best_baseline']['recall@100']['row'] != 'RecBole SASRec'
  assert table['wall_time_s']['RecBole SASRec']['mean'] == pytest.approx(2120.5)
  text = (out / 'table.md').read_text()
  line = next(x for x in text.splitlines() if x.startswith('| RecBole SASRec |'))
  assert line.split(' | ')[3] == 'n/a' and line.endswith('| 2 |')  # no Recall@100 measured
  assert 'RecBole SASRec: measured outside this sweep' in text
  assert _gather(out, '--split', 'valid', '--reference', f'R={tmp_path}/rb/*/results.json') == 0


@pytest.mark.parametrize('spec, message', [
    ('no-equals-sign', 'give NAME=GLOB'),
    ('R=nothing/*/results.json', "no file matches 'nothing/*/results.json'"),
    ('R={bad}', "is not a JSON object with a 'test' dict"),
    ('R={empty}', "has none of the metrics"),
    ('R={text}', 'a metric or the seed is not a number'),
    ('sasrec={good}', 'a row of that name is already in the table'),
    ('R={good} --reference R={good}', 'a row of that name is already in the table'),
])
def test_bad_references_fail_with_one_line_before_anything_is_written(fake_compare, tmp_path,
                                                                      capsys, spec, message):
  """Checked in main before any run trains (the same code path without --gather)."""
  out, _ = fake_compare
  (tmp_path / 'bad.json').write_text('[1, 2]')
  (tmp_path / 'empty.json').write_text(json.dumps({'test': {'mrr@10': 0.1}}))
  (tmp_path / 'text.json').write_text(json.dumps({'test': {'recall@50': 'high'}}))
  _write_reference(tmp_path / 'good', 0, {'recall@50': 0.4})
  spec = spec.format(bad=tmp_path / 'bad.json', empty=tmp_path / 'empty.json',
                     text=tmp_path / 'text.json',
                     good=tmp_path / 'good' / 'results.json')
  flags = [x for part in spec.split(' --reference ') for x in ('--reference', part)]
  assert _gather(out, *flags) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: --reference') and message in err and err.count('\n') == 1
  assert not (out / 'table.json').exists()


def test_gain_keeps_its_sign_and_is_undefined_for_a_zero_baseline(tmp_path):
  out = tmp_path / 'o'
  mine = {k: 0.1 for k in METRIC_NAMES}
  theirs = {k: 0.2 for k in METRIC_NAMES}
  theirs['mrr'] = 0.0
  mine['mrr'] = 0.0
  _write_run(out, 'heterrec-seed0', mine)
  _write_run(out, 'sasrec-seed0', theirs)
  assert ex.main(['compare', '--out', str(out), '--models', 'sasrec,heterrec', '--seeds', '1',
                  '--gather']) == 0
  table = json.loads((out / 'table.json').read_text())
  assert table['gain_percent']['recall@50'] == pytest.approx(-50.0)
  assert table['gain_percent']['mrr'] is None
  text = (out / 'table.md').read_text()
  assert '| Improvement | -50.00% |' in text and '| n/a | |' in text


def test_gather_without_popularity_lists_it_missing(tmp_path, capsys):
  out = tmp_path / 'o'
  _write_run(out, 'heterrec-seed0', {k: 0.1 for k in METRIC_NAMES})
  assert ex.main(['compare', '--out', str(out), '--models', 'heterrec,popularity', '--seeds',
                  '2', '--gather']) == 0
  table = json.loads((out / 'table.json').read_text())
  assert table['missing'] == ['heterrec-seed1', 'popularity']
  assert 'missing runs (2): heterrec-seed1, popularity' in capsys.readouterr().err


def test_popularity_is_computed_once_when_no_run_has_it(tmp_path, monkeypatch):
  out, floor = tmp_path / 'o', {k: 0.02 for k in METRIC_NAMES}
  _write_run(out, 'heterrec-seed0', {k: 0.1 for k in METRIC_NAMES})
  calls = []

  def fake_compute(sweep, progress):
    calls.append(sweep.out)
    (sweep.out / 'popularity.json').write_text(json.dumps({'valid': floor, 'test': floor}))
    return {'valid': floor, 'test': floor}

  monkeypatch.setattr(runner, 'compute_popularity', fake_compute)
  argv = ['compare', '--out', str(out), '--models', 'heterrec,popularity', '--seeds', '1']
  assert ex.main(argv + ['--gather']) == 0  # --gather never computes it
  assert calls == [] and json.loads((out / 'table.json').read_text())['missing'] == ['popularity']
  assert ex.main(argv) == 0  # heterrec-seed0 is finished: nothing trains, the floor is computed
  assert ex.main(argv) == 0  # and read back from OUT/popularity.json afterwards
  assert calls == [out]
  table = json.loads((out / 'table.json').read_text())
  assert table['rows']['popularity']['recall@10']['mean'] == 0.02 and table['missing'] == []


def test_popularity_that_cannot_be_computed_is_listed_missing(tmp_path, monkeypatch):
  def broken(sweep, progress):
    raise FileNotFoundError('no data')

  monkeypatch.setattr(runner, 'compute_popularity', broken)
  out = tmp_path / 'o'
  _write_run(out, 'heterrec-seed0', {k: 0.1 for k in METRIC_NAMES})
  assert ex.main(['compare', '--out', str(out), '--models', 'heterrec,popularity', '--seeds',
                  '1']) == 0
  assert json.loads((out / 'table.json').read_text())['missing'] == ['popularity']


def test_ablation_table_rows_and_gain_of_full(tmp_path):
  out = tmp_path / 'abl'
  for variant, value in (('full', 0.3), ('no_htfl', 0.2), ('no_mfk', 0.25)):
    _write_run(out, f'heterrec-{variant}-seed0', {k: value for k in METRIC_NAMES})
  assert ex.main(['compare', '--out', str(out), '--variants', 'full,no_htfl,no_mfk', '--seeds',
                  '1', '--gather']) == 0
  table = json.loads((out / 'table.json').read_text())
  assert table['best_baseline']['ndcg@50']['row'] == 'no_mfk'
  assert table['gain_percent']['ndcg@50'] == pytest.approx(20.0)
  assert table['gain_over_percent']['no_htfl']['ndcg@50'] == pytest.approx(50.0)
  text = (out / 'table.md').read_text()
  assert text.startswith('# Ablation (test split')
  order = [text.index(f'| {name} |') for name in ('w/o HTFL', '— w/o MFK', 'HeterRec',
                                                   'Best variant', 'Improvement')]
  assert order == sorted(order)


def test_option_ablation_rows_are_gathered_under_their_names(tmp_path):
  out = tmp_path / 'abl'
  for row, value in (('full', 0.3), ('no_positions', 0.2), ('no_smoothing', 0.25)):
    _write_run(out, f'heterrec-{row}-seed0', {k: value for k in METRIC_NAMES})
  assert ex.main(['compare', '--config', 'configs/ml100k.py', '--out', str(out), '--variants',
                  'full,no_positions,no_smoothing', '--seeds', '1', '--gather']) == 0
  table = json.loads((out / 'table.json').read_text())
  assert table['gain_over_percent']['no_positions']['ndcg@50'] == pytest.approx(50.0)
  assert table['gain_over_percent']['no_smoothing']['ndcg@50'] == pytest.approx(20.0)
  text = (out / 'table.md').read_text()
  assert '| w/o item positions | 0.2000 |' in text  # the best other row is in italics
  assert '| w/o label smoothing | _0.2500_ |' in text


def test_a_row_of_one_run_shows_no_spread(tmp_path):
  """One seed has no standard error: its cells are the bare value, a row of two keeps '±'."""
  out = tmp_path / 'abl'
  _write_run(out, 'heterrec-full-seed0', {k: 0.3 for k in METRIC_NAMES}, wall_time={'seconds': 7})
  _write_run(out, 'heterrec-full-seed1', {k: 0.4 for k in METRIC_NAMES}, wall_time={'seconds': 9})
  _write_run(out, 'heterrec-no_htfl-seed0', {k: 0.2 for k in METRIC_NAMES},
             wall_time={'seconds': 5})
  assert ex.main(['compare', '--out', str(out), '--variants', 'full,no_htfl', '--seeds', '2',
                  '--gather']) == 0
  lines = (out / 'table.md').read_text().splitlines()
  one = [line for line in lines if line.startswith('| w/o HTFL |')]
  two = [line for line in lines if line.startswith('| HeterRec |')]
  assert len(one) == 2 and len(two) == 2  # the metrics row and the wall-time row
  assert one[0].startswith('| w/o HTFL | _0.2000_ | _0.2000_ |') and '±' not in ''.join(one)
  assert one[1] == '| w/o HTFL | 5.0 | 1 | recorded |'
  assert '0.3500 ± 0.0500' in two[0] and '8.0 ± 1.4' in two[1]


def test_budget_mismatch_is_reported(tmp_path):
  out = tmp_path / 'o'
  cfg = load_config(str(ROOT / 'configs' / 'tiny.py'))
  saved = dataclasses.asdict(cfg)
  saved['train']['steps'] = 999
  _write_run(out, 'heterrec-seed0', {k: 0.1 for k in METRIC_NAMES}, config=saved)
  assert ex.main(['compare', '--out', str(out), '--config', 'configs/tiny.py', '--models',
                  'heterrec', '--seeds', '1', '--gather']) == 0
  table = json.loads((out / 'table.json').read_text())
  assert table['budget']['steps'] == cfg.train.steps
  assert len(table['warnings']) == 1 and 'heterrec-seed0' in table['warnings'][0]


def test_mixed_config_table_states_each_rows_own_budget(tmp_path):
  """A --model-config row trained by its own file's budget is no mismatch: no warning, and the
  budget line names that row's file and budget beside the sweep config's."""
  out = tmp_path / 'o'
  tiny = load_config(str(ROOT / 'configs' / 'tiny.py'))
  sasrec = load_config(str(ROOT / 'configs' / 'ml100k_sasrec.py'))
  assert sasrec.train.steps != tiny.train.steps
  _write_run(out, 'heterrec-seed0', {k: 0.2 for k in METRIC_NAMES},
             config=dataclasses.asdict(tiny))
  _write_run(out, 'sasrec-seed0', {k: 0.1 for k in METRIC_NAMES},
             config=dataclasses.asdict(sasrec))
  assert ex.main(['compare', '--out', str(out), '--config', 'configs/tiny.py', '--models',
                  'sasrec,heterrec', '--model-config', 'sasrec=configs/ml100k_sasrec.py',
                  '--seeds', '1', '--gather']) == 0
  table = json.loads((out / 'table.json').read_text())
  assert table['warnings'] == []
  assert table['budget']['steps'] == tiny.train.steps
  assert table['row_budgets']['sasrec']['steps'] == sasrec.train.steps
  line = (out / 'table.md').read_text().splitlines()[2]
  assert f'at most {tiny.train.steps} steps' in line
  assert f'SASRec (`configs/ml100k_sasrec.py`): at most {sasrec.train.steps} steps' in line


def test_wall_time_falls_back_to_file_times(tmp_path):
  run = _write_run(tmp_path, 'r', {k: 0.1 for k in METRIC_NAMES})
  (run / 'config.json').write_text('{}')
  os.utime(run / 'config.json', (1000.0, 1000.0))
  os.utime(run / 'results.json', (1042.5, 1042.5))
  assert gather.wall_seconds(run) == (pytest.approx(42.5), 'file times')
  # A run trained by `train` and copied in: the trainer's own record beats the file times.
  results = json.loads((run / 'results.json').read_text())
  results['training'] = {'wall_seconds': 301.5}
  (run / 'results.json').write_text(json.dumps(results))
  assert gather.wall_seconds(run) == (301.5, 'trainer')
  (run / 'wall_time.json').write_text(json.dumps({'seconds': 7.0}))
  assert gather.wall_seconds(run) == (7.0, 'recorded')


# ---- running (with a stand-in for train.train) ----------------------------------------------

def test_execute_records_wall_time_skips_finished_and_survives_failures(tmp_path, monkeypatch):
  calls = []

  def fake_train(cfg, workdir, progress=True):
    calls.append((cfg.model.name, cfg.train.seed, cfg.train.steps, workdir.name))
    if (cfg.model.name, cfg.train.seed) == ('sasrec', 1) and len(calls) < 5:
      raise RuntimeError('boom')
    workdir.mkdir(parents=True, exist_ok=True)
    metrics = {k: 0.1 * (1 + cfg.train.seed) for k in METRIC_NAMES}
    (workdir / 'results.json').write_text(json.dumps({'valid': metrics, 'test': metrics}))
    (workdir / 'popularity.json').write_text(json.dumps({'valid': metrics, 'test': metrics}))
    return {'status': 'done'}

  monkeypatch.setattr(train_lib, 'train', fake_train)
  out = tmp_path / 'o'
  argv = ['compare', '--models', 'heterrec,sasrec,popularity', '--seeds', '2', '--out', str(out),
          '--config', 'configs/tiny.py', '--steps', '3', '--quiet']
  assert ex.main(argv) == 1  # one run failed
  assert calls == [('heterrec', 0, 3, 'heterrec-seed0'), ('heterrec', 1, 3, 'heterrec-seed1'),
                   ('sasrec', 0, 3, 'sasrec-seed0'), ('sasrec', 1, 3, 'sasrec-seed1')]
  assert 'RuntimeError: boom' in (out / 'runs' / 'sasrec-seed1' / 'error.txt').read_text()
  for name in ('heterrec-seed0', 'sasrec-seed1'):
    assert json.loads((out / 'runs' / name / 'wall_time.json').read_text())['attempts'] == 1
  assert json.loads((out / 'table.json').read_text())['missing'] == ['sasrec-seed1']
  assert ex.main(argv) == 0  # resumes: only the failed run is trained again
  assert calls[4:] == [('sasrec', 1, 3, 'sasrec-seed1')]
  wall = json.loads((out / 'runs' / 'sasrec-seed1' / 'wall_time.json').read_text())
  assert (wall['attempts'], wall['status']) == (2, 'done')
  table = json.loads((out / 'table.json').read_text())
  assert table['missing'] == [] and table['rows']['popularity']['mrr']['mean'] > 0


def test_a_preempted_run_ends_the_sweep(tmp_path, monkeypatch):
  calls = []

  def preempted(cfg, workdir, progress=True):
    calls.append(workdir.name)
    return {'status': 'preempted', 'step': 3}

  monkeypatch.setattr(train_lib, 'train', preempted)
  out = tmp_path / 'o'
  assert ex.main(['compare', '--models', 'heterrec,sasrec', '--seeds', '2', '--out', str(out),
                  '--quiet']) == 1
  assert calls == ['heterrec-seed0']
  assert json.loads((out / 'runs' / 'heterrec-seed0' / 'wall_time.json').read_text())[
      'status'] == 'preempted'


# ---- tuning one field per row on validation --------------------------------------------------

def _fake_tuned_train(calls, score):
  """A stand-in for train.train whose validation ndcg@10 is score(model, tau)."""
  def train(cfg, workdir, progress=True):
    calls.append(workdir.name)
    valid = {k: 0.01 for k in METRIC_NAMES}
    valid['ndcg@10'] = score(cfg.model.name, cfg.loss.tau)
    test = {k: cfg.loss.tau + 0.001 * cfg.train.seed for k in METRIC_NAMES}
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / 'results.json').write_text(json.dumps({'valid': valid, 'test': test}))
    return {'status': 'done'}
  return train


def test_tune_chooses_per_row_on_validation_and_reuses_seed0(tmp_path, monkeypatch):
  calls = []
  best = {'heterrec': 0.2, 'sasrec': 0.5}
  monkeypatch.setattr(train_lib, 'train', _fake_tuned_train(
      calls, lambda m, tau: 1.0 - abs(tau - best[m])))
  out = tmp_path / 'o'
  assert ex.main(['compare', '--models', 'heterrec,sasrec', '--seeds', '3', '--out', str(out),
                  '--config', 'configs/tiny.py', '--tune', 'loss.tau=0.05,0.2,0.5',
                  '--quiet']) == 0
  tuning = [f'{m}-tau{v}-seed0' for m in ('heterrec', 'sasrec') for v in ('0.05', '0.2', '0.5')]
  seeds = [f'heterrec-tau0.2-seed{s}' for s in (1, 2)] + [f'sasrec-tau0.5-seed{s}' for s in (1, 2)]
  assert calls == tuning + seeds  # the chosen seed-0 run is not trained twice
  table = json.loads((out / 'table.json').read_text())
  assert table['seeds'] == {'heterrec': [0, 1, 2], 'sasrec': [0, 1, 2]}
  # The rows are the chosen value's runs: test metric = tau + 0.001 * seed.
  assert table['rows']['heterrec']['mrr']['mean'] == pytest.approx(0.201)
  assert table['rows']['sasrec']['mrr']['mean'] == pytest.approx(0.501)
  rows = table['tuning']['rows']
  assert (rows['heterrec']['chosen'], rows['sasrec']['chosen']) == ('0.2', '0.5')
  assert rows['sasrec']['scores'] == {'0.05': pytest.approx(0.55), '0.2': pytest.approx(0.7),
                                      '0.5': pytest.approx(1.0)}
  assert (table['tuning']['metric'], table['tuning']['missing']) == ('ndcg@10', [])
  text = (out / 'table.md').read_text()
  assert '| HeterRec (ours), tau=0.2 |' in text and '| SASRec, tau=0.5 |' in text
  assert '| SASRec | 0.5500 | 0.7000 | **1.0000** |' in text
  assert table['tuning']['at_grid_edge'] == ['sasrec']  # 0.5 is the last value tried
  assert 'Chosen at an end of the values tried: SASRec.' in text
  assert ex.main(['compare', '--models', 'heterrec,sasrec', '--seeds', '3', '--out', str(out),
                  '--config', 'configs/tiny.py', '--tune', 'loss.tau=0.05,0.2,0.5',
                  '--quiet']) == 0
  assert len(calls) == 10  # everything finished: a second run trains nothing


def test_a_tuning_sweep_has_runs_only_once_its_values_are_chosen(tmp_path):
  base = (sweep.Run('sasrec-seed0', 'sasrec', 0, ('model.name=sasrec', 'train.seed=0')),)
  tuning = sweep.Tuning('loss.tau', ('0.1', '0.2'), 'ndcg@10')
  tuning_sweep = sweep.Sweep('compare', 'configs/tiny.py', tmp_path, (), base, ('sasrec',),
                             tuning=tuning)
  with pytest.raises(ValueError, match='tuned'):
    _ = tuning_sweep.runs  # the base runs lack the tuned value: they are not the runs
  assert sweep.tuned(tuning_sweep).runs == ()  # nothing chosen yet
  valid = {k: 0.1 for k in METRIC_NAMES}
  _write_run(tmp_path, 'sasrec-tau0.1-seed0', valid, valid)
  _write_run(tmp_path, 'sasrec-tau0.2-seed0', valid, dict(valid, **{'ndcg@10': 0.3}))
  (run,) = sweep.tuned(tuning_sweep).runs
  assert (run.name, run.overrides[-1]) == ('sasrec-tau0.2-seed0', 'loss.tau=0.2')


def test_tune_ties_go_to_the_first_value_listed(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(train_lib, 'train', _fake_tuned_train(calls, lambda m, tau: 0.5))
  out = tmp_path / 'o'
  assert ex.main(['compare', '--models', 'sasrec', '--seeds', '1', '--out', str(out),
                  '--config', 'configs/tiny.py', '--tune', 'loss.tau=0.3,0.1', '--quiet']) == 0
  assert json.loads((out / 'table.json').read_text())['tuning']['rows']['sasrec']['chosen'] == '0.3'


def test_tune_plan_only_plans_the_seeds_once_tuning_has_finished(tmp_path, capsys):
  out = tmp_path / 'o'
  argv = ['compare', '--models', 'hstu,popularity', '--seeds', '2', '--out', str(out), '--data',
          'D', '--tune', 'optim.lr=0.001,0.01', '--plan-only']
  assert ex.main(argv) == 0
  expected = [_train_command('configs/default.py', out / 'runs' / f'hstu-lr{v}-seed0',
                             ['model.name=hstu', 'train.seed=0', f'optim.lr={v}', 'data.path=D'])
              for v in ('0.001', '0.01')]
  assert _plan(out) == expected
  assert 'waiting on their tuning runs (hstu)' in capsys.readouterr().err
  valid = {k: 0.1 for k in METRIC_NAMES}
  _write_run(out, 'hstu-lr0.001-seed0', valid, valid)
  assert ex.main(argv) == 0 and _plan(out) == expected  # one value unfinished: still waiting
  _write_run(out, 'hstu-lr0.01-seed0', valid, dict(valid, **{'ndcg@10': 0.2}))
  assert ex.main(argv) == 0
  assert _plan(out) == expected + [_train_command(
      'configs/default.py', out / 'runs' / 'hstu-lr0.01-seed1',
      ['model.name=hstu', 'train.seed=1', 'optim.lr=0.01', 'data.path=D'])]


def test_tune_gather_lists_unfinished_tuning_runs_missing(tmp_path):
  out = tmp_path / 'o'
  valid = {k: 0.1 for k in METRIC_NAMES}
  _write_run(out, 'heterrec-full-tau0.1-seed0', valid)
  assert ex.main(['compare', '--variants', 'full,no_hct', '--seeds', '1', '--out', str(out),
                  '--tune', 'loss.tau=0.1,0.2', '--gather']) == 0
  table = json.loads((out / 'table.json').read_text())
  assert table['missing'] == ['heterrec-full-tau0.2-seed0', 'heterrec-no_hct-tau0.1-seed0',
                              'heterrec-no_hct-tau0.2-seed0']
  assert table['rows'] == {} and table['tuning']['rows']['full']['chosen'] is None


# ---- scaling --------------------------------------------------------------------------------

def test_scaling_gather_writes_json_and_plot(tmp_path, monkeypatch):
  monkeypatch.setattr(flops, 'model_size', lambda cfg, run_dir: {
      'params': 1000 * (cfg.model.n1 + cfg.model.n2) + (0 if cfg.model.variant == 'full' else 7),
      'n_kinds': 3})
  out, rng = tmp_path / 'sc', np.random.default_rng(1)
  written = {}
  for variant in ('full', 'no_htfl'):
    for grid in ('1x1', '2x2'):
      written[f'{variant}-{grid}'] = _random_metrics(rng, 0.1)
      run = _write_run(out, f'{variant}-{grid}-seed0', written[f'{variant}-{grid}'])
  (run / 'flops.json').write_text(json.dumps({'flops_per_step': 1e9}))  # no_htfl-2x2
  (run / 'metrics.jsonl').write_text('{"step": 20, "split": "train", "loss": 1}\n'
                                     '{"step": 40, "split": "train", "loss": 1}\n')
  assert ex.main(['scaling', '--out', str(out), '--grid', '1x1,2x2,3x3', '--config',
                  'configs/tiny.py', '--gather']) == 0
  scaling = json.loads((out / 'scaling.json').read_text())
  points = {sweep.point_name(p['variant'], p['n1'], p['n2']): p for p in scaling['points']}
  assert sorted(points) == ['full-1x1', 'full-2x2', 'full-3x3', 'no_htfl-1x1', 'no_htfl-2x2',
                            'no_htfl-3x3']
  assert points['no_htfl-2x2']['train_flops'] == 1e9 * 40
  assert points['no_htfl-2x2']['flops_source'] == ['recorded']
  cfg = apply_overrides(load_config(str(ROOT / 'configs' / 'tiny.py')),
                        ['model.n1=2', 'model.n2=2'])
  assert points['full-2x2']['train_flops'] == pytest.approx(
      flops.analytic_train_flops(cfg, 3, cfg.train.steps))
  assert points['full-2x2']['params'] == 4000 and points['full-2x2']['layers'] == 4
  assert points['full-1x1']['metrics']['ndcg@50'] == pytest.approx(written['full-1x1']['ndcg@50'])
  assert points['full-3x3']['metrics'] == {} and points['full-3x3']['missing'] == ['full-3x3-seed0']
  assert scaling['missing'] == ['full-3x3-seed0', 'no_htfl-3x3-seed0']
  png = (out / 'scaling.png').read_bytes()
  assert png[:8] == b'\x89PNG\r\n\x1a\n' and len(png) > 10_000


def test_steps_trained_reads_the_last_train_step(tmp_path):
  assert scaling.steps_trained(tmp_path, 123) == 123
  (tmp_path / 'metrics.jsonl').write_text(
      '{"step": 10, "split": "train"}\n{"step": 10, "split": "valid"}\nnot json\n'
      '{"step": 30, "split": "train"}\n{"step": 30, "split": "test"}\n')
  assert scaling.steps_trained(tmp_path, 123) == 30


def _write_gate_log(run, best_step, rng):
  """A metrics.jsonl with gate shares logged every 10 steps to step 100 (plus noise lines), and
  the slow reference share per step: the plain mean over best/2 < step <= best."""
  lines, kept = [], {'step2': [], 'step3': []}
  for step in range(10, 101, 10):
    g2, g3 = rng.uniform(size=2)
    lines.append(json.dumps({'step': step, 'split': 'train', 'loss': 1.0,
                             'gate_fraction_step2': g2, 'gate_fraction_step3': g3}))
    lines.append(json.dumps({'step': step, 'split': 'valid', 'gate_fraction_step2': 9.0}))
    if best_step / 2 < step <= best_step:
      kept['step2'].append(g2)
      kept['step3'].append(g3)
  (run / 'metrics.jsonl').write_text('\n'.join(lines[:3] + ['not json'] + lines[3:]) + '\n')
  results = json.loads((run / 'results.json').read_text())
  results['training'] = {'best_step': best_step}
  (run / 'results.json').write_text(json.dumps(results))
  return {k: sum(v) / len(v) for k, v in kept.items()}


def test_ablation_table_has_standard_errors_and_the_gate_share(tmp_path):
  rng = np.random.default_rng(3)
  out, shares, values = tmp_path / 'abl', {}, {}
  for variant in ('full', 'no_lmp', 'no_tlmp'):
    for seed in range(3):
      values.setdefault(variant, []).append(_random_metrics(rng, 0.2))
      run = _write_run(out, f'heterrec-{variant}-seed{seed}', values[variant][-1])
      if variant != 'no_tlmp':  # pretend this one logs no gate
        shares.setdefault(variant, []).append(_write_gate_log(run, [60, 80, 100][seed], rng))
  assert ex.main(['compare', '--out', str(out), '--variants', 'full,no_lmp,no_tlmp', '--seeds',
                  '3', '--gather']) == 0
  table = json.loads((out / 'table.json').read_text())
  for variant, runs in values.items():
    xs = np.array([r['ndcg@50'] for r in runs])
    stat = table['rows'][variant]['ndcg@50']
    assert stat['se'] == pytest.approx(xs.std(ddof=1) / np.sqrt(3))
  assert set(table['gate_open']) == {'full', 'no_lmp'}
  for variant, per_seed in shares.items():
    for step in ('step2', 'step3'):
      xs = np.array([s[step] for s in per_seed])
      got = table['gate_open'][variant][step]
      assert got['mean'] == pytest.approx(xs.mean()) and got['n'] == 3
      assert got['se'] == pytest.approx(xs.std(ddof=1) / np.sqrt(3))
  text = (out / 'table.md').read_text()
  assert text.startswith('# Ablation (test split, mean ± standard error over seeds)')
  full = table['rows']['full']['ndcg@50']
  assert f'{full["mean"]:.4f} ± {full["se"]:.4f}' in text
  gate = table['gate_open']['full']['step3']
  assert '## Margin gate' in text and f'{gate["mean"]:.3f} ± {gate["se"]:.3f}' in text


def test_gate_share_without_a_training_record_uses_the_last_half(tmp_path):
  run = _write_run(tmp_path, 'r', {k: 0.1 for k in METRIC_NAMES})
  records = [{'step': s, 'split': 'train', 'gate_fraction_step2': s / 100} for s in (10, 20, 30, 40)]
  (run / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
  assert gather.gate_share(run) == {'step2': pytest.approx(0.35)}
  assert gather.gate_share(tmp_path / 'absent') == {}

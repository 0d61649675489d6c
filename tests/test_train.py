"""The sharded train step, compile-once, resume-equals-uninterrupted, divergence, end to end."""

import dataclasses
import json
import pathlib

import chex
import jax
import numpy as np
import pytest

from heterrec_jax import averaging, run as run_lib, sharding, train as train_lib
from heterrec_jax import evaluate as evaluate_lib, export as export_lib, seen
from heterrec_jax.config import ConfigError, MeshConfig, apply_overrides, load_config
from heterrec_jax.data import pipeline
from heterrec_jax.experiments import cli as experiments_cli

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  """The tiny config and its synthetic dataset, prepared once for the module."""
  cfg = load_config(str(ROOT / 'configs' / 'tiny.py'))
  workdir = tmp_path_factory.mktemp('tiny-data')
  dataset = run_lib.load_dataset(cfg, workdir, progress=False)
  cfg = apply_overrides(cfg, [f'data.path={dataset.path}'])
  return cfg, dataset


def _one_step(cfg, dataset, mesh):
  run = run_lib.build_run(cfg, dataset, mesh)
  batch_np = next(train_lib.train_iterator(cfg, run))
  batch = sharding.global_batch(batch_np, mesh)
  step = train_lib.make_train_step(run, batch)
  state, aux = step(run.state, batch)
  return run, jax.device_get(state), jax.device_get(aux)


def test_sharded_step_equals_one_device(tiny):
  cfg, dataset = tiny
  mesh8 = sharding.make_mesh(MeshConfig(data=4, model=2))
  mesh1 = sharding.make_mesh(MeshConfig(data=1, model=1), jax.devices()[:1])
  run8, state8, aux8 = _one_step(cfg, dataset, mesh8)
  _, state1, aux1 = _one_step(cfg, dataset, mesh1)
  np.testing.assert_allclose(aux8['loss'], aux1['loss'], rtol=1e-5)
  leaves8, leaves1 = jax.tree.leaves(state8), jax.tree.leaves(state1)
  assert len(leaves8) == len(leaves1)
  for a, b in zip(leaves8, leaves1):
    if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    if np.issubdtype(np.asarray(a).dtype, np.floating):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # The embedding tables really are split over the "model" axis.
  model = run8.model()
  tables = [v for path, v in jax.tree.leaves_with_path(nnx_params(model))
            if 'emb' in jax.tree_util.keystr(path).lower()]
  assert tables, 'no embedding tables found'
  specs = {str(t.sharding.spec) for t in tables if t.ndim == 2}
  assert any("'model'" in s for s in specs), specs


def nnx_params(model):
  from flax import nnx
  return nnx.state(model, nnx.Param)


@pytest.mark.parametrize('microbatches', [1, 2])
def test_train_step_compiles_once(tiny, microbatches):
  """With dropout on; in 2 parts, the dropout streams run on from part to part."""
  cfg, dataset = tiny
  cfg = apply_overrides(cfg, [f'train.microbatches={microbatches}'])
  chex.clear_trace_counter()  # the counter is per step function, and each case builds one
  mesh = sharding.make_mesh(MeshConfig(data=4, model=2))
  run = run_lib.build_run(cfg, dataset, mesh)
  data_iter = train_lib.train_iterator(cfg, run)
  batch = sharding.global_batch(next(data_iter), mesh)
  step = train_lib.make_train_step(run, batch, decorate=chex.assert_max_traces(n=1))
  state = run.state
  for _ in range(4):
    state, aux = step(state, sharding.global_batch(next(data_iter), mesh))
  assert np.isfinite(float(aux['loss']))


def test_counted_pairs_match_a_loop():
  rng = np.random.default_rng(0)
  lengths = rng.integers(0, 10, size=12)
  mask = (np.arange(9)[None] < lengths[:, None])  # windows of T + 1 = 9 events
  count_from = rng.integers(0, 8, size=12)
  got = train_lib.counted_pairs({'mask': mask, 'count_from': count_from}, max_len=8)
  want = [sum(1 for t in range(8) if mask[b, t] and mask[b, t + 1] and t >= count_from[b])
          for b in range(12)]
  np.testing.assert_array_equal(got, want)
  # A Cloze window (no next event): its counted real positions.
  got = train_lib.counted_pairs({'mask': mask[:, :8]}, max_len=8)
  np.testing.assert_array_equal(got, mask[:, :8].sum(1))


def _step_state(cfg, dataset, mesh, microbatches, batch_np):
  cfg = apply_overrides(cfg, [f'train.microbatches={microbatches}'])
  run = run_lib.build_run(cfg, dataset, mesh)
  batch = sharding.global_batch(batch_np, mesh)
  state, aux = train_lib.make_train_step(run, batch)(run.state, batch)
  return jax.device_get(state), jax.device_get(aux)


def _assert_params_close(state_a, state_b):
  from flax import nnx
  for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(state_a[0])),
                  jax.tree.leaves(nnx.to_pure_dict(state_b[0]))):
    if jax.numpy.issubdtype(a.dtype, jax.numpy.floating):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('model', ['sasrec', 'heterrec'])
def test_microbatches_give_the_whole_batch_update(tiny, model):
  """One mean over the next-item pairs (SASRec's cross-entropy, LMP at N_step 1 with its token
  level): 4 parts give the whole batch's loss and update, on 1 and on 8 devices."""
  cfg, dataset = tiny
  cfg = apply_overrides(cfg, ['model.dropout=0.0', 'loss.n_step=1', f'model.name={model}'])
  mesh1 = sharding.make_mesh(MeshConfig(data=1, model=1), jax.devices()[:1])
  run = run_lib.build_run(cfg, dataset, mesh1)
  batch_np = next(train_lib.train_iterator(cfg, run))
  counts = np.asarray(train_lib.counted_pairs(batch_np, cfg.data.max_len))
  assert len({counts[m::4].sum() for m in range(4)}) > 1  # unequal parts: weights matter
  whole, aux_whole = _step_state(cfg, dataset, mesh1, 1, batch_np)
  parts, aux_parts = _step_state(cfg, dataset, mesh1, 4, batch_np)
  np.testing.assert_allclose(aux_parts['loss'], aux_whole['loss'], rtol=1e-5)
  _assert_params_close(parts, whole)
  if model == 'sasrec':  # the parts' split of a data-sharded batch (model-independent)
    parts8, _ = _step_state(cfg, dataset, sharding.make_mesh(MeshConfig(data=2, model=4)), 4,
                            batch_np)
    _assert_params_close(parts8, whole)


def test_accumulated_gradient_is_the_pair_weighted_mean_of_the_parts(tiny):
  """LMP at N_step 2 is not one mean: the parts' gradients, weighted by their next-item
  pairs, against each part differentiated alone."""
  from flax import nnx
  cfg, dataset = tiny
  cfg = apply_overrides(cfg, ['model.dropout=0.0'])
  mesh1 = sharding.make_mesh(MeshConfig(data=1, model=1), jax.devices()[:1])
  run = run_lib.build_run(cfg, dataset, mesh1)
  batch = {k: np.asarray(v) for k, v in next(train_lib.train_iterator(cfg, run)).items()}
  compute_loss, rng, m = train_lib.make_loss(run), jax.random.key(3), 4
  graphdef, state = nnx.split(run.model())
  loss, _, grads = jax.jit(lambda state, batch: train_lib.accumulate_gradients(
      compute_loss, nnx.merge(graphdef, state), batch, rng, m, cfg.data.max_len))(state, batch)

  @jax.jit
  def part_gradient(state, part, key):
    return nnx.value_and_grad(lambda model: compute_loss(model, part, key),
                              has_aux=True)(nnx.merge(graphdef, state))

  counts = np.asarray(train_lib.counted_pairs(batch, cfg.data.max_len))
  weights = np.array([counts[i::m].sum() for i in range(m)]) / counts.sum()
  want_loss, want = 0.0, None
  for i in range(m):
    part = {k: v[i::m] for k, v in batch.items()}
    (part_loss, _), g = part_gradient(state, part, jax.random.fold_in(rng, i))
    g = jax.tree.map(lambda x: weights[i] * np.asarray(x), nnx.to_pure_dict(g))
    want = g if want is None else jax.tree.map(np.add, want, g)
    want_loss += weights[i] * float(part_loss)
  np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               jax.device_get(nnx.to_pure_dict(grads)), want)


def test_microbatches_must_divide_the_batch_per_device(tiny):
  cfg, _ = tiny
  with pytest.raises(ConfigError, match='train.microbatches=3 must divide train.batch_size=16'):
    apply_overrides(cfg, ['train.microbatches=3'])
  with pytest.raises(ConfigError, match='train.microbatches=0 is not allowed'):
    apply_overrides(cfg, ['train.microbatches=0'])
  cfg = apply_overrides(cfg, ['train.microbatches=8'])
  with pytest.raises(ConfigError, match=r'train.microbatches=8 must divide the 4 windows per '
                                        r'device \(train.batch_size=16 over 4'):
    run_lib.check_batch_sizes(cfg, sharding.make_mesh(MeshConfig(data=4, model=2)))


def _free_vector_step(tiny, override):
  """One step of the tiny run with a free per-item vector (weight decay 0.01), from the same
  state and batch, without and with `override`: (cfg, before, plain, changed), each a
  {parameter path: float64 array} of the floating parameters, and the free table's keys."""
  from flax import nnx
  cfg, dataset = tiny
  cfg = apply_overrides(cfg, ['model.dropout=0.0', 'model.item_id_vector=true',
                              'optim.warmup_steps=0', 'optim.weight_decay=0.01'])
  mesh1 = sharding.make_mesh(MeshConfig(data=1, model=1), jax.devices()[:1])
  batch_np = next(train_lib.train_iterator(cfg, run_lib.build_run(cfg, dataset, mesh1)))
  before = jax.device_get(run_lib.build_run(cfg, dataset, mesh1).state[0])
  plain, _ = _step_state(cfg, dataset, mesh1, 1, batch_np)
  changed, _ = _step_state(apply_overrides(cfg, [override]), dataset, mesh1, 1, batch_np)
  flat = lambda state: {jax.tree_util.keystr(p): np.asarray(v, np.float64) for p, v in
                        jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(state))
                        if jax.numpy.issubdtype(v.dtype, jax.numpy.floating)}
  before, plain, changed = flat(before), flat(plain[0]), flat(changed[0])
  vector_keys = [k for k in plain if 'item_vectors' in k]
  assert vector_keys
  return cfg, before, plain, changed, vector_keys


def test_vector_decay_pulls_only_the_free_vector_table(tiny):
  """optim.vector_decay: one step from the same state with it and without; only the free
  per-item vectors differ, by exactly -lr * vector_decay * their value before the step."""
  cfg, before, plain, decayed, vector_keys = _free_vector_step(tiny, 'optim.vector_decay=0.5')
  for key in plain:
    if key in vector_keys:
      np.testing.assert_allclose(decayed[key] - plain[key], -cfg.optim.lr * 0.5 * before[key],
                                 rtol=1e-3, atol=1e-8)  # float32 differences of ~1e-5
    else:
      np.testing.assert_array_equal(decayed[key], plain[key], err_msg=key)


def test_label_smoothing_with_a_token_level_source_of_its_own(tiny):
  """configs/toys.py's case: the item level over the whole catalogue smoothed, the token
  level on 'uniform' (never smoothed): the loss builds, steps, and differs from eps = 0 by
  the item level alone."""
  cfg, dataset = tiny
  cfg = apply_overrides(cfg, ['model.dropout=0.0', 'loss.negatives=all',
                              'loss.token_negatives=uniform', 'loss.w_tok=0.5'])
  mesh1 = sharding.make_mesh(MeshConfig(data=1, model=1), jax.devices()[:1])
  batch_np = next(train_lib.train_iterator(cfg, run_lib.build_run(cfg, dataset, mesh1)))
  _, plain = _step_state(cfg, dataset, mesh1, 1, batch_np)
  _, smooth = _step_state(apply_overrides(cfg, ['loss.label_smoothing=0.2']), dataset, mesh1,
                          1, batch_np)
  assert np.isfinite(smooth['loss'])
  np.testing.assert_allclose(smooth['token_loss'], plain['token_loss'], rtol=1e-6)
  assert abs(float(smooth['item_loss'] - plain['item_loss'])) > 1e-3


def test_vector_lr_scale_speeds_only_the_free_vector_table(tiny):
  """optim.vector_lr_scale=3: one step from the same state with it and without; the free
  per-item vectors' Adam step is 3x (the decoupled weight decay is not scaled), every other
  parameter steps exactly as without."""
  cfg, before, plain, fast, vector_keys = _free_vector_step(tiny, 'optim.vector_lr_scale=3')
  lr, wd = cfg.optim.lr, cfg.optim.weight_decay
  for key in plain:
    if key in vector_keys:
      adam_step = (plain[key] - before[key]) / -lr - wd * before[key]
      assert np.abs(adam_step).max() > 0.1  # the table did move
      expected = before[key] - lr * (3.0 * adam_step + wd * before[key])
      np.testing.assert_allclose(fast[key], expected, rtol=1e-4, atol=1e-6)
    else:
      np.testing.assert_array_equal(fast[key], plain[key], err_msg=key)


def test_sharded_run_with_ema_reads_the_average(tiny):
  """optim.ema on 8 devices: the averaged parameters are sharded as the raw ones, equal a
  NumPy average of the iterates, and evaluation scores them, not the last iterate."""
  from flax import nnx
  cfg, dataset = tiny
  cfg = apply_overrides(cfg, ['optim.ema=0.5'])
  mesh = sharding.make_mesh(MeshConfig(data=4, model=2))
  run = run_lib.build_run(cfg, dataset, mesh)
  data_iter = train_lib.train_iterator(cfg, run)
  batch = sharding.global_batch(next(data_iter), mesh)
  step = train_lib.make_train_step(run, batch)
  iterates = []
  for _ in range(3):
    run.state, _ = step(run.state, sharding.global_batch(next(data_iter), mesh))
    iterates.append(jax.device_get(nnx.to_pure_dict(nnx.state(run.model(), nnx.Param))))
  averaged = nnx.to_pure_dict(nnx.state(nnx.merge(nnx.graphdef(run.model()),
                                                  averaging.model_state(run.state)),
                                        nnx.Param))
  weights = np.array([0.125, 0.25, 0.5]) / 0.875
  want = jax.tree.map(lambda *xs: sum(w * x for w, x in zip(weights, xs)), *iterates)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               jax.device_get(averaged), want)
  raw, ema = jax.tree.leaves(nnx_params(run.model())), jax.tree.leaves(averaged)
  assert [a.sharding.spec for a in raw] == [a.sharding.spec for a in ema]
  last_iterate = (run.state[0], {'opt_state': {}})  # a state without an average: raw params
  assert evaluate_lib.evaluate(run, 'valid') != evaluate_lib.evaluate(run, 'valid',
                                                                      state=last_iterate)


def _losses(workdir):
  lines = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return {r['step']: r['loss'] for r in lines if r['split'] == 'train'}


def test_resume_with_a_larger_patience_goes_on_after_an_early_stop(tiny, tmp_path):
  """train.patience is a resumable change: a run that early stopping ended continues when
  resumed with patience off (to train.steps), and stays ended when resumed as it was."""
  cfg, _ = tiny
  cfg = apply_overrides(cfg, ['train.steps=12', 'train.eval_every=1', 'train.patience=1',
                              'train.checkpoint_every=100', 'optim.lr=0.5'])
  first = train_lib.train(cfg, tmp_path / 'run', progress=False)
  assert first['status'] == 'done'
  record = json.loads((tmp_path / 'run' / 'results.json').read_text())['training']
  assert record['stopped_early'] and record['steps'] < 12, record
  again = train_lib.train(cfg, tmp_path / 'run', progress=False)
  assert again['step'] == record['steps']
  longer = train_lib.train(apply_overrides(cfg, ['train.patience=0']), tmp_path / 'run',
                           progress=False)
  assert longer['step'] == 12
  record = json.loads((tmp_path / 'run' / 'results.json').read_text())['training']
  assert not record['stopped_early'] and record['steps'] == 12


def test_resume_equals_uninterrupted(tiny, tmp_path):
  cfg, _ = tiny
  cfg = apply_overrides(cfg, ['train.steps=6', 'train.checkpoint_every=100',
                              'train.eval_every=0'])
  straight = train_lib.train(cfg, tmp_path / 'straight', progress=False)
  assert straight['status'] == 'done'
  killed = train_lib.train(cfg, tmp_path / 'resumed', progress=False, stop_after=3)
  assert killed == {'status': 'interrupted', 'step': 3}
  assert (tmp_path / 'resumed' / 'checkpoints' / '3').is_dir()
  resumed = train_lib.train(cfg, tmp_path / 'resumed', progress=False)
  assert resumed['status'] == 'done' and resumed['step'] == 6
  a, b = _losses(tmp_path / 'straight'), _losses(tmp_path / 'resumed')
  lines = (tmp_path / 'resumed' / 'metrics.jsonl').read_text().splitlines()
  keys = [(r['step'], r['split']) for r in map(json.loads, lines)]
  assert len(keys) == len(set(keys)), 'a replayed step was written twice'
  for step in (4, 5, 6):
    np.testing.assert_allclose(b[step], a[step], rtol=1e-6)
  np.testing.assert_allclose(resumed['test']['mrr'], straight['test']['mrr'], rtol=1e-5)


def test_non_finite_loss_stops_before_checkpoint(tiny, tmp_path, monkeypatch):
  cfg, _ = tiny
  real = train_lib.losses.make

  def make_nan_loss(*args, **kwargs):
    loss_fn = real(*args, **kwargs)

    def nan_loss(*args):
      loss, aux = loss_fn(*args)
      return loss * np.nan, aux
    return nan_loss

  monkeypatch.setattr(train_lib.losses, 'make', make_nan_loss)
  with pytest.raises(train_lib.TrainingDiverged, match='loss is nan at step'):
    train_lib.train(cfg, tmp_path / 'nan', progress=False)
  ckpts = tmp_path / 'nan' / 'checkpoints'
  assert not ckpts.exists() or not any(p.name.isdigit() for p in ckpts.iterdir())


def test_train_end_to_end_writes_results_and_exports(tiny, tmp_path, capsys):
  cfg, dataset = tiny
  out = train_lib.train(cfg, tmp_path / 'run', progress=False)
  results = json.loads((tmp_path / 'run' / 'results.json').read_text())
  assert set(results) == {'valid', 'test', 'training'}
  assert set(results['test']) >= {'recall@10', 'ndcg@10', 'recall@200', 'ndcg@200', 'mrr'}
  training = results['training']
  per_epoch = pipeline.windows_per_epoch(dataset, cfg.data.max_len,
                                         cfg.loss.n_step, cfg.data.window)
  assert training['steps'] == cfg.train.steps and training['examples_per_epoch'] == per_epoch
  np.testing.assert_allclose(training['epochs'],
                             cfg.train.steps * cfg.train.batch_size / per_epoch, atol=1e-3)
  assert training['wall_seconds'] > 0
  assert 0.0 <= results['test']['recall@200'] <= 1.0
  assert (tmp_path / 'run' / 'tensorboard').is_dir()
  table = train_lib.results_table(cfg, out)
  assert 'popularity (test)' in table
  # Re-evaluating the saved best state gives the same numbers.
  run = run_lib.restore_run(tmp_path / 'run', 'best')
  again = evaluate_lib.evaluate(run, 'test')
  np.testing.assert_allclose(again['mrr'], results['test']['mrr'], rtol=1e-5)
  # The per-user ranks behind `--by-popularity` give the same metrics in one group.
  rank_U, target_U = evaluate_lib.target_ranks(run, 'test')
  counts_N = evaluate_lib.training_counts(run.dataset)
  (whole,) = evaluate_lib.metrics_by_popularity(rank_U, target_U, counts_N, 1).values()
  for name, value in again.items():
    np.testing.assert_allclose(whole[name], value, rtol=1e-5, err_msg=name)
  capsys.readouterr()
  assert evaluate_lib.main(['--workdir', str(tmp_path / 'run'), '--split', 'test',
                            '--by-popularity', '3']) == 0
  out = capsys.readouterr().out
  assert 'test, by the target' in out and out.count('popularity, targets with') >= 1
  # `experiments paired` of the run against itself: the run's own figures, no difference.
  assert experiments_cli.main(['paired', '--a', str(tmp_path / 'run'), '--b',
                               str(tmp_path / 'run'), '--resamples', '20', '--quiet',
                               '--out', str(tmp_path / 'paired.json')]) == 0
  for name, row in json.loads((tmp_path / 'paired.json').read_text())['metrics'].items():
    np.testing.assert_allclose(row['a'], results['test'][name], rtol=1e-5, err_msg=name)
    assert row['relative'] in (0.0, None) and row['a_ahead'] == 0.0
  manifest = export_lib.export_run(tmp_path / 'run', tmp_path / 'export')
  items = np.load(tmp_path / 'export' / 'item_embeddings.npy')
  assert items.shape == (manifest['n_items'], manifest['d_k'])
  assert manifest['scoring'] == cfg.loss.scoring == 'cosine'
  np.testing.assert_allclose(np.linalg.norm(items, axis=1), 1.0, rtol=1e-4)
  exported = jax.export.deserialize((tmp_path / 'export' / 'user_tower.jaxexport').read_bytes())
  window = export_lib.latest_windows(run.dataset, np.arange(3), cfg.data.max_len)
  users = np.load(tmp_path / 'export' / 'user_embeddings.npy')
  np.testing.assert_allclose(exported.call(*window.values()), users[:3], rtol=1e-4, atol=1e-5)


def test_export_of_a_dot_scoring_run_keeps_the_scored_vectors(tiny, tmp_path):
  """Under loss.scoring='dot' the exported item rows are the raw V the evaluation ranks with
  (a normalised export would rank items by cosine, not by the model's score). The run has
  model.seen_bias too: its offsets train (they move from 0) and the manifest carries them."""
  cfg, _ = tiny
  cfg = apply_overrides(cfg, ['loss.scoring=dot', 'loss.tau=1.0', 'train.steps=2',
                              'train.eval_every=0', 'train.checkpoint_every=100',
                              'model.seen_bias=true', 'loss.negatives=all'])
  assert train_lib.train(cfg, tmp_path / 'run', progress=False)['status'] == 'done'
  manifest = export_lib.export_run(tmp_path / 'run', tmp_path / 'export', 'latest')
  assert manifest['scoring'] == 'dot'
  w_K = np.asarray(manifest['seen_offsets'])
  assert w_K.shape == (seen.BUCKETS,) and np.abs(w_K).max() > 0
  assert 'seen_offsets' in manifest['score']
  items = np.load(tmp_path / 'export' / 'item_embeddings.npy')
  run = run_lib.restore_run(tmp_path / 'run', 'latest')
  scored = evaluate_lib.item_vectors(evaluate_lib.eval_graphdef(run),
                                     averaging.model_state(run.state), run.dataset,
                                     cfg.eval.item_batch_size)
  np.testing.assert_allclose(items, np.asarray(scored)[1:], rtol=1e-5, atol=1e-6)
  assert np.abs(np.linalg.norm(items, axis=1) - 1.0).max() > 1e-2


def _plateau_reference(scores, patience, cuts, factor):
  """The learning-rate multiplier after each validation, by the rule written out longhand."""
  best, since, made, out = -np.inf, 0, 0, []
  for score in scores:
    if score > best:
      best, since = score, 0
    else:
      since += 1
      if since >= patience and made < cuts:
        made, since = made + 1, 0
    out.append(factor ** made)
  return out


def test_plateau_schedule_cuts_the_rate_as_the_longhand_rule_does(tiny, tmp_path, monkeypatch):
  """Validation scores are scripted (random, with repeats, so plateaus of every length occur):
  after each, the optimiser state's multiplier is the longhand rule's; the cuts are logged and
  counted; a resumed trainer keeps the multiplier and the counts."""
  cfg, _ = tiny
  cfg = apply_overrides(cfg, ['optim.schedule=plateau', 'optim.plateau_patience=2',
                              'optim.plateau_cuts=3', 'optim.plateau_factor=0.5',
                              'train.patience=0'])
  scores = list(np.random.default_rng(0).integers(0, 6, size=24) / 10.0)
  expected = _plateau_reference(scores, 2, 3, 0.5)
  assert 1.0 in expected and 0.125 in expected  # the script reaches every cut
  feed = iter(scores)
  monkeypatch.setattr(train_lib.evaluate_lib, 'evaluate',
                      lambda run, split, *a, **k: {cfg.train.early_stop_metric: next(feed)})
  trainer = train_lib.Trainer(cfg, tmp_path / 'run', progress=False)
  try:
    for want in expected:
      trainer.record.step += 1
      trainer.validate()
      assert float(_lr_scale(trainer.run.state)) == pytest.approx(want)
    trainer.save()
    record = dataclasses.asdict(trainer.record)
  finally:
    trainer.close()
  assert record['lr_cuts'] == 3
  rows = [json.loads(l) for l in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
  assert [r['lr_scale'] for r in rows if r['split'] == 'schedule'] == [0.5, 0.25, 0.125]
  again = train_lib.Trainer(cfg, tmp_path / 'run', progress=False)
  try:
    assert dataclasses.asdict(again.record) == record
    assert float(_lr_scale(again.run.state)) == 0.125
  finally:
    again.close()


def _lr_scale(state):
  (leaf,) = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state)
             if 'step_size' in jax.tree_util.keystr(path)]
  return leaf


def test_the_multiplier_scales_the_step(tiny):
  """From one state and batch, a step at multiplier 0.3 moves every parameter 0.3x as far as
  one at 1 (the multiplier scales AdamW's whole update, decay included)."""
  cfg, dataset = tiny
  cfg = apply_overrides(cfg, ['optim.schedule=plateau', 'optim.weight_decay=0.1',
                              'optim.warmup_steps=0'])
  mesh = sharding.make_mesh(MeshConfig(data=1, model=1), jax.devices()[:1])
  run = run_lib.build_run(cfg, dataset, mesh)
  batch = sharding.global_batch(next(train_lib.train_iterator(cfg, run)), mesh)
  step = train_lib.make_train_step(run, batch)
  before = jax.device_get(nnx_params(run.model()))
  moved = {}
  for scale in (1.0, 0.3):
    state = run_lib.set_lr_scale(jax.tree.map(lambda x: x.copy(), run.state), scale)
    state, _ = step(state, batch)
    after = jax.device_get(nnx_params(run.model(state)))
    moved[scale] = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), after, before)
  for full, cut in zip(jax.tree.leaves(moved[1.0]), jax.tree.leaves(moved[0.3])):
    np.testing.assert_allclose(cut, 0.3 * full, rtol=1e-4, atol=1e-7)
  assert any(np.abs(x).max() > 0 for x in jax.tree.leaves(moved[1.0]))


def test_set_lr_scale_needs_the_plateau_schedule(tiny):
  cfg, dataset = tiny
  mesh = sharding.make_mesh(MeshConfig(data=1, model=1), jax.devices()[:1])
  run = run_lib.build_run(cfg, dataset, mesh)
  with pytest.raises(ValueError, match="optim.schedule='plateau'"):
    run_lib.set_lr_scale(run.state, 0.5)

"""Bad inputs to train, evaluate and export: each ends with its exit code and one `error:` line
(no traceback), and leaves every pre-existing file as it was (hashed before and after)."""

import hashlib
import json
import pathlib
import shutil

import pytest

from heterrec_jax import evaluate as evaluate_lib
from heterrec_jax import export as export_lib
from heterrec_jax import train as train_lib
from heterrec_jax import workdir as workdir_lib
from heterrec_jax.data import prepare, synthetic

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = str(ROOT / 'configs' / 'tiny.py')
MAINS = {'train': train_lib.main, 'evaluate': evaluate_lib.main, 'export': export_lib.main}


def tree_hash(*paths: pathlib.Path) -> str:
  """Every file's relative path and bytes (the workdir lock file aside: taking it rewrites it)."""
  digest = hashlib.sha256()
  for root in paths:
    digest.update(f'<{root}:{root.exists()}:{root.is_dir()}>'.encode())
    if root.is_file():
      digest.update(root.read_bytes())
    files = sorted(root.rglob('*')) if root.is_dir() else []
    for f in files:
      if f.name == workdir_lib.LOCK_FILE:
        continue
      digest.update(str(f.relative_to(root)).encode())
      if f.is_file():
        digest.update(f.read_bytes())
  return digest.hexdigest()


def expect_error(capsys, command, argv, fragment, guarded):
  """Runs `command`'s main in-process; checks exit 2, one error line holding `fragment`, no
  traceback, and nothing under `guarded` changed."""
  before = tree_hash(*guarded)
  capsys.readouterr()
  rc = MAINS[command](argv)
  err = capsys.readouterr().err
  errors = [line for line in err.splitlines() if line.startswith('error:')]
  assert rc == 2, err
  assert len(errors) == 1, err
  assert fragment in errors[0], errors[0]
  assert 'Traceback' not in err, err
  assert tree_hash(*guarded) == before, f'{command} {argv} changed {guarded}'


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  """A finished tiny run (trained once for the module)."""
  workdir = tmp_path_factory.mktemp('bad-inputs') / 'run'
  assert train_lib.main(['--config', TINY, '--workdir', str(workdir)]) == 0
  return workdir


@pytest.fixture(scope='module')
def swapped(finished, tmp_path_factory):
  """A copy of the finished run whose data folder now holds another dataset of the same shapes."""
  workdir = tmp_path_factory.mktemp('swapped') / 'run'
  shutil.copytree(finished, workdir)
  cfg = json.loads((finished / 'config.json').read_text())['data']
  raw = synthetic.generate(cfg['synthetic_users'], cfg['synthetic_items'],
                           cfg['synthetic_topics'], cfg['synthetic_seed'] + 1)
  prepare.prepare_dataset(raw, workdir / 'data', progress=False, overwrite=True)
  return workdir


@pytest.fixture
def scratch(tmp_path):
  """A folder with a file, a config file per defect, and an unrelated non-empty folder."""
  (tmp_path / 'a_file').write_text('not a folder\n')
  (tmp_path / 'syntax.py').write_text('def get_config(:\n  pass\n')
  (tmp_path / 'dict.py').write_text('def get_config():\n  return {"model": {}}\n')
  (tmp_path / 'raises.py').write_text('import nonexistent_module_xyz\n')
  (tmp_path / 'no_get.py').write_text('x = 1\n')
  (tmp_path / 'boom.py').write_text('def get_config():\n  raise RuntimeError("boom")\n')
  (tmp_path / 'other').mkdir()
  (tmp_path / 'other' / 'precious.txt').write_text('keep me\n')
  return tmp_path


TRAIN_OVERRIDES = [
    ('optim.b1=1.5', 'optim.b1=1.5 is not allowed'),
    ('optim.b2=1.0', 'optim.b2=1.0 is not allowed'),
    ('optim.b2=-0.5', 'optim.b2=-0.5 is not allowed'),
    ('optim.lr=nan', 'optim.lr=nan'),
    ('optim.lr=-1', 'optim.lr=-1.0'),
    ('optim.final_lr_fraction=2', 'optim.final_lr_fraction=2.0'),
    ('loss.tau=inf', 'loss.tau=inf'),
    ('data.seed=-1', 'data.seed=-1'),
    ('train.seed=-2', 'train.seed=-2'),
    ('model.dropout=nan', 'model.dropout=nan'),
    ('model.input_dropout=1', 'model.input_dropout=1.0 must be in [0, 1)'),
    ('model.linear_std=-0.02', 'model.linear_std=-0.02 is not allowed; it must be >= 0'),
    ('model.attention_dropout=1', 'model.attention_dropout=1.0 must be in [0, 1)'),
    ('model.token_dropout=1', 'model.token_dropout=1.0 must be in [0, 1), or negative'),
    ('model.head_init=zero', "model.head_init='zero'"),
    ('model.nope=1', "unknown config field 'model.nope'"),
    ('train.steps', 'field.name=value'),
    ('train.early_stop_metric=auc', 'train.early_stop_metric'),
    ('train.batch_size=12', 'train.batch_size=12 must divide'),
    ('eval.batch_size=6', 'eval.batch_size=6 must divide'),
    ('mesh.data=3', 'mesh.data=3'),
    ('data.path=/nonexistent/heterrec', 'not a prepared dataset folder'),
    ('model.v_features=false', 'model.v_features=False leaves V empty'),
    ('train.host_allocator=jemalloc',
     "train.host_allocator='jemalloc' is not allowed; use one of ('auto', 'system', 'reuse')"),
    ('train.cpu_devices=-2', 'train.cpu_devices=-2 is not allowed; it must be >= 0'),
]


@pytest.mark.parametrize('override, fragment', TRAIN_OVERRIDES)
def test_train_bad_override(capsys, tmp_path, override, fragment):
  workdir = tmp_path / 'run'
  expect_error(capsys, 'train', ['--config', TINY, '--workdir', str(workdir), override],
               fragment, [tmp_path])


def test_train_id_row_in_v_with_unequal_widths(capsys, tmp_path):
  expect_error(capsys, 'train', ['--config', TINY, '--workdir', str(tmp_path / 'run'),
                                 'model.item_id_row_in_v=true', 'model.d_k=32'],
               'model.item_id_row_in_v needs model.d_f == model.d_k (got d_f=16, d_k=32)',
               [tmp_path])


@pytest.mark.parametrize('config, fragment', [
    ('syntax.py', 'syntax.py:1: syntax error'),
    ('dict.py', 'returned a dict, not a heterrec_jax.config.Config'),
    ('raises.py', 'failed to load: ModuleNotFoundError'),
    ('no_get.py', 'does not define get_config()'),
    ('boom.py', 'get_config() failed: RuntimeError: boom'),
    ('missing.py', 'does not exist'),
    ('other', 'does not exist'),
])
def test_train_bad_config_file(capsys, scratch, config, fragment):
  expect_error(capsys, 'train', ['--config', str(scratch / config), '--workdir',
                                 str(scratch / 'run')], fragment, [scratch])


def test_train_workdir_is_a_file(capsys, scratch):
  expect_error(capsys, 'train', ['--config', TINY, '--workdir', str(scratch / 'a_file')],
               'is a file, not a folder', [scratch])


def test_train_workdir_under_a_file(capsys, scratch):
  expect_error(capsys, 'train', ['--config', TINY, '--workdir', str(scratch / 'a_file' / 'x')],
               'a_file', [scratch])


def test_train_resume_with_another_config(capsys, finished):
  expect_error(capsys, 'train', ['--config', TINY, '--workdir', str(finished), 'model.d_f=32'],
               'model.d_f: 16 -> 32', [finished])


def test_train_resume_on_another_dataset(capsys, swapped):
  expect_error(capsys, 'train', ['--config', TINY, '--workdir', str(swapped)],
               'trained on another dataset', [swapped])


def test_train_workdir_locked_by_another_run(capsys, finished):
  lock = workdir_lib.Lock(finished)
  try:
    expect_error(capsys, 'train', ['--config', TINY, '--workdir', str(finished)],
                 'is in use by another run', [finished])
  finally:
    lock.release()


def test_stale_lock_of_a_dead_process_is_taken_over(finished):
  (finished / workdir_lib.LOCK_FILE).write_text('999999999\n')  # no such process holds it
  lock = workdir_lib.Lock(finished)
  lock.release()


@pytest.mark.parametrize('command', ['evaluate', 'export'])
def test_missing_workdir(capsys, scratch, command):
  argv = ['--workdir', str(scratch / 'none')]
  argv += ['--output', str(scratch / 'out')] if command == 'export' else []
  expect_error(capsys, command, argv, 'config.json does not exist', [scratch])


@pytest.mark.parametrize('command', ['evaluate', 'export'])
def test_workdir_is_a_file(capsys, scratch, command):
  argv = ['--workdir', str(scratch / 'a_file')]
  argv += ['--output', str(scratch / 'out')] if command == 'export' else []
  expect_error(capsys, command, argv, 'is a file', [scratch])


@pytest.mark.parametrize('command', ['evaluate', 'export'])
def test_on_another_dataset(capsys, swapped, tmp_path, command):
  argv = ['--workdir', str(swapped)]
  argv += ['--output', str(tmp_path / 'out')] if command == 'export' else []
  expect_error(capsys, command, argv, 'trained on another dataset', [swapped, tmp_path])


def test_evaluate_damaged_config_json(capsys, finished, tmp_path):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'config.json').write_text('{"model": {"d_f": ')
  expect_error(capsys, 'evaluate', ['--workdir', str(workdir)], 'config.json is damaged',
               [workdir])


def test_evaluate_config_json_with_a_bad_value(capsys, finished, tmp_path):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  cfg = json.loads((finished / 'config.json').read_text())
  cfg['optim']['b1'] = 1.5
  (workdir / 'config.json').write_text(json.dumps(cfg))
  expect_error(capsys, 'evaluate', ['--workdir', str(workdir)], 'optim.b1=1.5', [workdir])


def test_evaluate_without_checkpoints(capsys, finished, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(finished, workdir, ignore=shutil.ignore_patterns('best', 'checkpoints'))
  expect_error(capsys, 'evaluate', ['--workdir', str(workdir)], 'no checkpoint in', [workdir])


@pytest.fixture
def refuse_computation(monkeypatch):
  """Export must refuse a bad --output before it restores anything."""
  def fail(*args, **kwargs):
    raise AssertionError('export restored the run before checking --output')
  monkeypatch.setattr(export_lib, 'restore_run', fail)


@pytest.mark.parametrize('output, fragment', [
    ('a_file', 'is a file'),
    ('other', 'is a non-empty folder that is not an export'),
    ('WORKDIR', 'is (or holds) the workdir'),
    ('PARENT', 'is (or holds) the workdir'),
])
def test_export_bad_output(capsys, finished, scratch, refuse_computation, output, fragment):
  path = {'WORKDIR': finished, 'PARENT': finished.parent}.get(output, scratch / output)
  expect_error(capsys, 'export', ['--workdir', str(finished), '--output', str(path)], fragment,
               [finished, scratch])


def test_evaluate_negative_group_count_is_refused_before_anything_is_read(capsys, finished):
  before = tree_hash(finished)
  with pytest.raises(SystemExit) as exit_info:
    evaluate_lib.main(['--workdir', str(finished), '--by-popularity', '-1'])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert '--by-popularity must be >= 0' in err and 'Traceback' not in err
  assert tree_hash(finished) == before


def test_evaluate_by_popularity_refuses_several_processes(capsys, finished, monkeypatch):
  """The per-user ranks come back to one host: a multi-process job is told so, reading nothing."""
  monkeypatch.setattr(evaluate_lib.jax, 'process_count', lambda: 2)
  expect_error(capsys, 'evaluate', ['--workdir', str(finished), '--by-popularity', '3'],
               'run it in one process (this job has 2)', [finished])

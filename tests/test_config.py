"""Config checks, dotted overrides and config files."""

import dataclasses
import json
import pathlib
import re

import pytest

from heterrec_jax import config as config_lib
from heterrec_jax.config import Config, ConfigError, apply_overrides, load_config

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_overrides_set_typed_values():
  cfg = apply_overrides(Config(), ['model.n1=3', 'loss.tau=0.1', 'loss.gate=false',
                                   'data.path=/x', 'loss.token_kinds=genre,year'])
  assert cfg.model.n1 == 3 and isinstance(cfg.model.n1, int)
  assert cfg.loss.tau == 0.1
  assert cfg.loss.gate is False
  assert cfg.data.path == '/x'
  assert cfg.loss.token_kinds == ('genre', 'year')


@pytest.mark.parametrize('order', [1, -1])
def test_overrides_are_checked_together_in_any_order(order):
  # loss.negatives=all and data.stride=60 alone are refused (log-Q needs a batch source; the
  # default max_len is 50); with their partners they are valid, whatever the order.
  pinnerformer = load_config(str(ROOT / 'configs' / 'ml100k_pinnerformer.py'))
  cfg = apply_overrides(pinnerformer, ['loss.negatives=all', 'loss.log_q=false'][::order])
  assert (cfg.loss.negatives, cfg.loss.log_q) == ('all', False)
  cfg = apply_overrides(Config(), ['data.max_len=80', 'data.stride=60'][::order])
  assert (cfg.data.max_len, cfg.data.stride) == (80, 60)
  with pytest.raises(ConfigError, match='log_q'):
    apply_overrides(pinnerformer, ['loss.negatives=all'])


def test_an_override_given_twice_takes_its_last_value():
  assert apply_overrides(Config(), ['model.n1=3', 'model.n1=2']).model.n1 == 2


@pytest.mark.parametrize('overrides, fragment', [
    (['model=3', 'model.n1=2'], "'model' is a group"),
    (['model.n1=2', 'model=3'], "'model' is a group"),
    (['model.n1=2', 'model.n1.x=3'], "'model.n1' has no sub-field 'x'"),
    (['data.jitter=true', 'data.window=last'], "data.jitter=True needs data.window='all'"),
])
def test_a_field_and_its_group_together_is_an_error(overrides, fragment):
  with pytest.raises(ConfigError, match=re.escape(fragment)):
    apply_overrides(Config(), overrides)


@pytest.mark.parametrize('override, fragment', [
    ('model.nope=1', "unknown config field 'model.nope'"),
    ('model.n1=abc', 'model.n1'),
    ('loss.negatives=random', "loss.negatives='random' is not allowed"),
    ('model.variant=tiny', 'model.variant'),
    ('model=3', 'is a group'),
    ('model.n1', 'field.name=value'),
    ('model.d_f=31', 'divisible by model.heads'),
    ('optim.b1=1.5', r'optim.b1=1.5 is not allowed; it must be in [0, 1)'),
    ('optim.b2=1', r'optim.b2=1.0 is not allowed; it must be in [0, 1)'),
    ('optim.lr=nan', 'optim.lr=nan is not allowed; it must be a finite number'),
    ('loss.tau=inf', 'loss.tau=inf is not allowed; it must be a finite number'),
    ('optim.final_lr_fraction=1.5', r'must be in [0, 1]'),
    ('data.seed=-1', 'data.seed=-1 is not allowed'),
    ('train.seed=-1', 'train.seed=-1 is not allowed'),
    ('data.stride=51', 'data.stride=51 must be in [0, data.max_len=50]'),
    ('data.stride=-1', 'data.stride=-1 must be in [0, data.max_len=50]'),
    ('data.window=first', "data.window='first' is not allowed"),
    ('loss.token_negatives=random', "loss.token_negatives='random' is not allowed"),
    ('loss.scoring=l2', "loss.scoring='l2' is not allowed"),
    ('loss.logits_budget_mb=0', 'loss.logits_budget_mb=0 is not allowed'),
    ('loss.n_uniform=0', 'loss.n_uniform=0 is not allowed'),
    ('loss.log_q=true', "it needs loss.negatives 'in_batch' or 'mixed', not 'all'"),
    ('optim.schedule=linear', "optim.schedule='linear' is not allowed"),
    ('optim.plateau_factor=1', 'optim.plateau_factor=1.0 is not allowed; it must be in (0, 1)'),
    ('optim.plateau_factor=0', 'optim.plateau_factor=0.0 is not allowed; it must be in (0, 1)'),
    ('optim.plateau_patience=0', 'optim.plateau_patience=0 is not allowed; it must be > 0'),
    ('optim.plateau_cuts=-1', 'optim.plateau_cuts=-1 is not allowed; it must be >= 0'),
    ('optim.vector_decay=-0.1', 'optim.vector_decay=-0.1 is not allowed'),
    ('optim.vector_decay=nan', 'optim.vector_decay=nan is not allowed'),
    ('optim.vector_decay=0.5', 'only HeterRec with model.item_id_vector=true'),
    ('loss.label_smoothing=1', 'loss.label_smoothing=1.0 is not allowed; it must be in [0, 1)'),
    ('loss.label_smoothing=-0.1', 'loss.label_smoothing=-0.1 is not allowed'),
    ('optim.vector_lr_scale=0', 'optim.vector_lr_scale=0.0 is not allowed; it must be > 0'),
    ('optim.vector_lr_scale=2', 'only HeterRec with model.item_id_vector=true'),
])
def test_bad_overrides_name_the_field(override, fragment):
  with pytest.raises(ConfigError, match=re.escape(fragment)):
    apply_overrides(Config(), [override])


def test_label_smoothing_needs_the_whole_catalogue():
  with pytest.raises(ConfigError, match=re.escape("it needs loss.negatives='all', not 'uniform'")):
    apply_overrides(Config(), ['loss.negatives=uniform', 'loss.label_smoothing=0.1'])
  with pytest.raises(ConfigError, match=re.escape("its in-batch loss (loss.name='sampled_softmax')")):
    apply_overrides(Config(), ['model.name=bert4rec', 'loss.name=sampled_softmax',
                               'loss.label_smoothing=0.1'])
  apply_overrides(Config(), ['model.name=bert4rec', 'loss.label_smoothing=0.1'])  # Cloze: fine


@pytest.mark.parametrize('name', sorted(p.stem for p in (ROOT / 'configs').glob('*.py')))
def test_config_files_load(name):
  cfg = load_config(str(ROOT / 'configs' / f'{name}.py'))
  assert isinstance(cfg, Config)


def test_paper_config_is_the_papers_setting():
  cfg = load_config(str(ROOT / 'configs' / 'paper.py'))
  assert (cfg.data.max_len, cfg.model.n1, cfg.model.n2) == (256, 2, 2)
  assert (cfg.loss.lambda_m, cfg.loss.n_step) == (1.0, 3)


@pytest.mark.parametrize('toys, base, changed', [
    ('toys', 'ml100k', {'data': ('path', 'max_len', 'stride'),
                        'model': ('d_f', 'n2', 'dropout', 'attention_dropout'),
                        'loss': ('token_negatives', 'label_smoothing'),
                        'optim': ('weight_decay',),
                        'train': ('steps',)}),
    ('toys_sasrec', 'ml100k_sasrec', {'data': ('path', 'max_len', 'stride'),
                                      'model': ('dropout', 'n2'), 'optim': ('weight_decay',),
                                      'train': ('steps',)}),
])
def test_toys_files_change_only_what_their_docstrings_say(toys, base, changed):
  toys_cfg = load_config(str(ROOT / 'configs' / f'{toys}.py'))
  base_cfg = load_config(str(ROOT / 'configs' / f'{base}.py'))
  for group in dataclasses.fields(Config):
    new, old = getattr(toys_cfg, group.name), getattr(base_cfg, group.name)
    differ = {f.name for f in dataclasses.fields(new)
              if getattr(new, f.name) != getattr(old, f.name)}
    assert differ == set(changed.get(group.name, ())), group.name
  assert (toys_cfg.data.max_len, toys_cfg.data.stride, toys_cfg.model.dropout) == (20, 10, 0.2)


def test_missing_config_file_is_a_clear_error(tmp_path):
  with pytest.raises(ConfigError, match='does not exist'):
    load_config(str(tmp_path / 'none.py'))
  (tmp_path / 'empty.py').write_text('x = 1\n')
  with pytest.raises(ConfigError, match='get_config'):
    load_config(str(tmp_path / 'empty.py'))
  (tmp_path / 'syntax.py').write_text('x = 1\ndef get_config(:\n')
  with pytest.raises(ConfigError, match=r'syntax.py:2: syntax error'):
    load_config(str(tmp_path / 'syntax.py'))
  (tmp_path / 'dict.py').write_text('def get_config():\n  return {}\n')
  with pytest.raises(ConfigError, match='returned a dict, not a heterrec_jax.config.Config'):
    load_config(str(tmp_path / 'dict.py'))


def test_metric_names_cover_cutoffs():
  assert config_lib.METRIC_NAMES[:2] == ('recall@10', 'ndcg@10')
  assert 'mrr' in config_lib.METRIC_NAMES


def test_resuming_with_another_config_is_refused(tmp_path):
  cfg = Config()
  config_lib.save_config(cfg, tmp_path)
  assert config_lib.load_saved_config(tmp_path) == cfg
  config_lib.check_resumable(apply_overrides(cfg, ['train.steps=5', 'eval.batch_size=8',
                                                  'train.microbatches=4']), tmp_path)
  with pytest.raises(ConfigError, match=r'model.d_f: 64 -> 32'):
    config_lib.check_resumable(apply_overrides(cfg, ['model.d_f=32']), tmp_path)


def test_a_field_newer_than_the_saved_run_counts_as_its_default(tmp_path):
  """A run saved before a field existed resumes under a config that leaves the field at its
  default (what the older version did), and is refused one that sets it."""
  cfg = Config()
  config_lib.save_config(cfg, tmp_path)
  saved = json.loads((tmp_path / 'config.json').read_text())
  del saved['model']['input_dropout']
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  config_lib.check_resumable(cfg, tmp_path)
  with pytest.raises(ConfigError, match=r'model.input_dropout: 0.0 -> 0.2'):
    config_lib.check_resumable(apply_overrides(cfg, ['model.input_dropout=0.2']), tmp_path)

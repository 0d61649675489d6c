"""The FLOP formula and the parameter counts of heterrec_jax.flops."""

import pathlib

import pytest
from flax import nnx

from heterrec_jax import flops
from heterrec_jax.config import apply_overrides, load_config
from heterrec_jax.data import prepare

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_stack_flops_counts_each_matmul():
  length, width, mult = 4, 2, 1

  def matmul(a, b, c):
    return 2 * a * b * c

  expected = (4 * matmul(length, width, width)  # Q, K, V, O projections
              + matmul(length, width, mult * width) + matmul(length, mult * width, width)  # FFN
              + matmul(length, width, length) + matmul(length, length, width))  # QK^T, AV
  assert flops.stack_flops(1, length, width, mult) == expected
  assert flops.stack_flops(3, length, width, mult) == 3 * expected


def test_analytic_flops_scale_with_layers_steps_and_htfl():
  cfg = load_config(str(ROOT / 'configs' / 'tiny.py'))
  def estimate(steps=10, **model):
    return flops.analytic_train_flops(apply_overrides(cfg, [f'model.{k}={v}' for k, v in
                                                           model.items()]), 3, steps)
  assert estimate(steps=20) == 2 * estimate(steps=10)
  assert estimate(n1=2) > estimate(n1=1) and estimate(n2=2) > estimate(n2=1)
  m, t, b = cfg.model, cfg.data.max_len, cfg.train.batch_size
  token_stage = 3 * b * 10 * flops.stack_flops(m.n1, t * 3, m.d_f, m.ffn_mult)
  assert estimate() - estimate(variant='no_htfl') == pytest.approx(token_stage)


def test_count_params_counts_only_params():
  assert flops.count_params(lambda: nnx.Linear(3, 4, rngs=nnx.Rngs(0))) == 3 * 4 + 4
  assert flops.count_params(lambda: nnx.BatchNorm(5, rngs=nnx.Rngs(0))) == 2 * 5  # not the stats


def test_model_size_counts_the_model_of_a_config_on_its_dataset(tmp_path):
  folder = tmp_path / 'toy'
  folder.mkdir()
  (folder / 'toy.inter').write_text('user_id:token\titem_id:token\ttimestamp:float\n' + ''.join(
      f'u{u}\ti{(u + t) % 5}\t{t}\n' for u in range(4) for t in range(4)))
  (folder / 'toy.item').write_text('item_id:token\tcolor:token\n' + ''.join(
      f'i{i}\tc{i % 2}\n' for i in range(5)))
  assert prepare.main(['--format', 'recbole', '--input', str(folder), '--output',
                       str(tmp_path / 'ds'), '--quiet']) == 0
  cfg = apply_overrides(load_config(str(ROOT / 'configs' / 'tiny.py')),
                        [f'data.path={tmp_path / "ds"}'])
  sizes = {}
  for name, extra in (('1x1', []), ('2x1', ['model.n1=2']), ('no_htfl', ['model.variant=no_htfl'])):
    sizes[name] = flops.model_size(apply_overrides(cfg, extra), tmp_path / 'unused')
  assert sizes['1x1']['n_kinds'] == 2  # item id, color
  assert sizes['2x1']['params'] > sizes['1x1']['params'] > sizes['no_htfl']['params'] > 0
  missing = flops.model_size(apply_overrides(cfg, ['data.path=']), tmp_path / 'nothing')
  assert 'params' not in missing and 'schema.json' in missing['error']

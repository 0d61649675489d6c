"""Each HeterRec ablation switch changes exactly the computation it names (SPEC sections 3-6)."""

import dataclasses

import jax
import numpy as np
from flax import nnx

from heterrec_jax import lmp as loss_lib
from heterrec_jax.config import LossConfig, ModelConfig
from heterrec_jax.model import HeterRec
from tests.test_model import RAW, SCHEMA, _batch

N_STEP = 2
LOSS = LossConfig(n_step=N_STEP, tau=0.5, lambda_m=0.0, negatives='same_position')


def _model(variant):
  cfg = ModelConfig(variant=variant, d_f=8, d_k=12, heads=2, n1=1, n2=1, ffn_mult=2,
                    dropout=0.0, time_buckets=8)
  model = HeterRec(SCHEMA, cfg, LOSS, rngs=nnx.Rngs(0), embeddings=RAW)
  model.eval()
  return model


def _loss(variant, batch):
  model = _model(variant)
  outputs = model.forward(batch)
  cfg = loss_lib.ablated(LOSS, variant)
  return loss_lib.heterrec_loss(outputs, batch, model.token_kinds, cfg, jax.random.key(0))


def test_no_tlmp_has_no_token_level_term_and_the_same_item_term():
  batch = _batch()
  full, full_aux = _loss('full', batch)
  ablated, aux = _loss('no_tlmp', batch)
  assert float(full_aux['token_loss']) > 0
  assert float(aux['token_loss']) == 0
  np.testing.assert_allclose(ablated, aux['item_loss'], rtol=1e-6)
  # Same parameters (same seed), same user tower: only the token-level term is gone.
  np.testing.assert_allclose(aux['item_loss'], full_aux['item_loss'], rtol=1e-5)


def test_no_lmp_removes_only_the_gate():
  assert loss_lib.ablated(LOSS, 'no_lmp') == dataclasses.replace(LOSS, gate=False)
  batch = _batch()
  _, full_aux = _loss('full', batch)
  _, aux = _loss('no_lmp', batch)
  assert float(aux['gate_fraction_step2']) == 1.0
  np.testing.assert_allclose(aux['item_loss_step1'], full_aux['item_loss_step1'], rtol=1e-6)
  if float(full_aux['gate_fraction_step2']) < 1.0:  # the gate dropped positions: step 2 differs
    assert not np.isclose(aux['item_loss_step2'], full_aux['item_loss_step2'])


def test_model_ablations_leave_the_loss_alone():
  for variant in ('full', 'no_htfl', 'no_mfk', 'no_hct'):
    assert loss_lib.ablated(LOSS, variant) == LOSS


def test_no_hct_has_no_item_level_stage_and_one_flat_stack():
  model = _model('no_hct')
  assert not hasattr(model, 'item_stage') and not hasattr(model, 'token_stage')
  assert len(model.flat_stage.blocks) == 2  # N1 + N2 blocks over the flat tokens
  full = _model('full')
  assert len(full.token_stage.blocks) == 1 and len(full.item_stage.blocks) == 1


def test_no_htfl_keeps_the_item_stage_and_drops_the_token_stage():
  model = _model('no_htfl')
  assert model.token_stage is None and len(model.item_stage.blocks) == 1
  assert model.token_kinds == ()


def test_no_mfk_replaces_quantised_codes_by_the_raw_embedding():
  full, ablated = _model('full'), _model('no_mfk')
  kinds_full = [type(f).__name__ for f in full.htfl.features]
  kinds_ablated = [type(f).__name__ for f in ablated.htfl.features]
  changed = [(a, b) for a, b in zip(kinds_full, kinds_ablated) if a != b]
  assert changed == [('MultimodalToken', 'RawModalToken')]


def test_variants_without_token_loss_have_no_empty_arrays_to_checkpoint():
  """Orbax cannot save zero-size arrays: no token-level loss means no token heads at all."""
  for variant in ('no_htfl', 'no_tlmp'):
    model = _model(variant)
    assert model.token_heads is None
    sizes = [np.size(x) for x in jax.tree.leaves(nnx.state(model))]
    assert min(sizes) > 0, variant

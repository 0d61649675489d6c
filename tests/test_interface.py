"""Every model satisfies the `RetrievalModel` protocol, and an object missing a method does not."""

import pytest
from flax import nnx

from heterrec_jax import baselines
from heterrec_jax.config import LossConfig, ModelConfig
from heterrec_jax.data.dataset import Feature, Schema
from heterrec_jax.interface import RetrievalModel
from heterrec_jax.model import HeterRec

SCHEMA = Schema((Feature('item_id', 'categorical', 0, 1, 12), Feature('genre', 'multi', 1, 2, 5)),
                n_users=3, n_items=10, n_events=20)
CFG = dict(d_f=8, d_k=8, heads=2, n1=1, n2=1, ffn_mult=1, time_buckets=4)


@pytest.mark.parametrize('name', ('heterrec',) + baselines.BASELINES)
def test_every_model_is_a_retrieval_model(name):
  cfg = ModelConfig(name=name, **CFG)
  loss = LossConfig(n_step=2)
  if name == 'heterrec':
    model = HeterRec(SCHEMA, cfg, loss, rngs=nnx.Rngs(0))
  else:
    model = baselines.build_baseline(SCHEMA, cfg, loss, nnx.Rngs(0), 4)
  assert isinstance(model, RetrievalModel)
  assert model.horizon in (0, 1, 2)


def test_an_incomplete_object_is_not():
  class NoUserVector:
    token_kinds, horizon = (), 1

    def forward(self, batch):
      return batch

    def encode_items(self, items, tokens):
      return items, None

  assert not isinstance(NoUserVector(), RetrievalModel)

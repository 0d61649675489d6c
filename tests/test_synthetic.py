"""The built-in synthetic source: seeded, sized by its arguments, and its features carry signal."""

import numpy as np
import pytest

from heterrec_jax.data import synthetic
from heterrec_jax.data.raw import PrepareError


@pytest.fixture(scope='module')
def raw():
  return synthetic.generate(n_users=300, n_items=200, n_topics=8, seed=3)


def test_same_seed_same_data_other_seed_other_data(raw):
  again = synthetic.generate(n_users=300, n_items=200, n_topics=8, seed=3)
  other = synthetic.generate(n_users=300, n_items=200, n_topics=8, seed=4)
  np.testing.assert_array_equal(raw.items, again.items)
  np.testing.assert_array_equal(raw.timestamps, again.timestamps)
  np.testing.assert_array_equal(raw.embeddings['text'], again.embeddings['text'])
  assert raw.items.size != other.items.size or (raw.items != other.items).any()


def test_sizes_follow_the_arguments(raw):
  assert len(raw.item_table.keys) == 200
  assert len(np.unique(raw.users)) == 300
  assert raw.embeddings['text'].shape == (200, synthetic.EMBEDDING_DIM)
  counts = np.unique(raw.users, return_counts=True)[1]
  assert counts.min() >= synthetic.MIN_EVENTS


def test_events_are_time_ordered_within_each_user(raw):
  for user in np.unique(raw.users)[:50]:
    ts = raw.timestamps[raw.users == user]
    assert (np.diff(ts) > 0).all()


def _category_of(raw):
  index = {k: i for i, k in enumerate(raw.item_table.keys)}
  cats = np.array(raw.item_table.columns['category'].values)
  return cats[[index[i] for i in raw.items]]


def test_consecutive_items_share_features_far_more_than_chance(raw):
  """The drift between topics is slow, so the next item's category is predictable."""
  cat_E = _category_of(raw)
  same_user = raw.users[1:] == raw.users[:-1]
  agree = (cat_E[1:] == cat_E[:-1])[same_user].mean()
  _, freq = np.unique(cat_E, return_counts=True)
  chance = ((freq / freq.sum()) ** 2).sum()
  assert agree > 3 * chance, (agree, chance)


def test_items_of_one_category_cluster_in_embedding_space(raw):
  cats = np.array(raw.item_table.columns['category'].values)
  emb = raw.embeddings['text']
  c = cats[0]
  inside = emb[cats == c]
  outside = emb[cats != c]
  centre = inside.mean(0)
  assert np.linalg.norm(inside - centre, axis=1).mean() < np.linalg.norm(
      outside - centre, axis=1).mean()


def test_bad_sizes_are_clear_errors():
  with pytest.raises(PrepareError, match='--users=0'):
    synthetic.generate(n_users=0)

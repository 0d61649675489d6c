"""The built-in synthetic source: a seeded dataset whose item features carry the signal.

    python -m heterrec_jax.data.prepare --format synthetic --users 2000 --items-count 1000 \\
        --topics 16 --seed 0 --output data/synthetic

The generative story (all of it drawn from one `numpy.random.Generator(seed)`):
  * Every item belongs to one latent topic. The items of a topic share its categories (2 per
    topic, 10% of items get a random one), its brands (3 per topic), its tags (a multi-valued
    feature: 1-3 of the topic's 4 tags, plus a global tag now and then), a price band
    (log-normal around the topic's median, 5% missing) and an embedding cluster (a 32-d text
    embedding: the topic centroid plus noise, so the quantised codes of a topic agree).
  * Within a topic, item popularity is long-tailed (Zipf-like): many items are seen a few times,
    so an id-only model learns little about them while their features still place them.
  * Users drift between topics over time: each user has a current topic; after every event the
    topic stays, or moves to a neighbouring topic (z +- 1), or jumps to a random one. The
    chance of moving grows with the time gap before the next event, and every user has his own
    typical gap (log-uniform from a minute to a month), so time gaps carry signal too.
A model that reads item features can therefore beat one that sees item ids only.
"""

from __future__ import annotations

import numpy as np

from heterrec_jax.data.raw import (FLOAT, TOKEN, TOKEN_SEQ, Column, ItemTable, PrepareError,
                                   RawData)

EMBEDDING_DIM = 32
START_TIME = 1_600_000_000  # 2020-09-13, unix seconds
CATEGORIES_PER_TOPIC, BRANDS_PER_TOPIC, TAGS_PER_TOPIC = 2, 3, 4
MIN_EVENTS, MEAN_EXTRA_EVENTS = 6, 24


def _item_topics(rng: np.random.Generator, n_items: int, n_topics: int) -> np.ndarray:
  """Topic of each item, every topic used (items assigned round-robin, then shuffled)."""
  return rng.permutation(np.arange(n_items) % n_topics)


def _pick(rng: np.random.Generator, topic_N: np.ndarray, per_topic: int) -> np.ndarray:
  """One of the `per_topic` values of each item's topic: `topic * per_topic + j`."""
  return topic_N * per_topic + rng.integers(0, per_topic, topic_N.size)


def _tags(rng: np.random.Generator, topic_N: np.ndarray) -> list[tuple[str, ...]]:
  counts_N = rng.integers(1, 4, topic_N.size)
  rows = []
  for topic, count in zip(topic_N, counts_N):
    tags = rng.choice(TAGS_PER_TOPIC, size=count, replace=False)
    row = tuple(f'tag{topic}_{t}' for t in sorted(tags))
    rows.append(row + ('popular',) if rng.random() < 0.1 else row)
  return rows


def item_table(rng: np.random.Generator, topic_N: np.ndarray, n_topics: int) -> ItemTable:
  """Categorical, multi-valued and numerical features that follow each item's topic."""
  n = topic_N.size
  category_N = _pick(rng, topic_N, CATEGORIES_PER_TOPIC)
  noisy_N = rng.random(n) < 0.1
  category_N = np.where(noisy_N, rng.integers(0, n_topics * CATEGORIES_PER_TOPIC, n), category_N)
  brand_N = _pick(rng, topic_N, BRANDS_PER_TOPIC)
  median_Z = np.exp(rng.uniform(np.log(2.0), np.log(500.0), n_topics))
  price_N = np.round(median_Z[topic_N] * np.exp(0.25 * rng.standard_normal(n)), 2)
  price_N[rng.random(n) < 0.05] = np.nan
  columns = {
      'category': Column(TOKEN, [f'cat{c}' for c in category_N]),
      'brand': Column(TOKEN, [f'brand{b}' for b in brand_N]),
      'tags': Column(TOKEN_SEQ, _tags(rng, topic_N)),
      'price': Column(FLOAT, [float(p) for p in price_N]),
  }
  return ItemTable(keys=[f'item{i}' for i in range(n)], columns=columns)


def text_embeddings(rng: np.random.Generator, topic_N: np.ndarray, n_topics: int) -> np.ndarray:
  """float32 [n_items, 32]: the topic's centroid plus item noise."""
  centroid_ZxD = rng.standard_normal((n_topics, EMBEDDING_DIM))
  noise_NxD = 0.5 * rng.standard_normal((topic_N.size, EMBEDDING_DIM))
  return (centroid_ZxD[topic_N] + noise_NxD).astype(np.float32)


def topic_sampler(rng: np.random.Generator, topic_N: np.ndarray, n_topics: int):
  """Per topic, its items and their long-tailed popularity; returns `draw(topics_U)`."""
  members = [np.flatnonzero(topic_N == z) for z in range(n_topics)]
  weights = []
  for items in members:
    w = 1.0 / (1.0 + rng.permutation(items.size)) ** 1.1
    weights.append(np.cumsum(w) / w.sum())

  def draw(topics_U: np.ndarray) -> np.ndarray:
    out = np.empty(topics_U.size, np.int64)
    for z in np.unique(topics_U):
      rows = np.flatnonzero(topics_U == z)
      picks = np.searchsorted(weights[z], rng.random(rows.size), side='right')
      out[rows] = members[z][np.minimum(picks, members[z].size - 1)]
    return out
  return draw


def user_events(rng: np.random.Generator, draw, n_users: int, n_topics: int):
  """(user, item, timestamp) arrays, generated step by step for all users at once."""
  length_U = MIN_EVENTS + rng.geometric(1.0 / MEAN_EXTRA_EVENTS, n_users)
  mean_gap_U = np.exp(rng.uniform(np.log(60.0), np.log(30 * 86400.0), n_users))
  topic_U = rng.integers(0, n_topics, n_users)
  time_U = START_TIME + rng.integers(0, 365 * 86400, n_users)
  users, items, times = [], [], []
  for step in range(int(length_U.max())):
    live_U = np.flatnonzero(length_U > step)
    items.append(draw(topic_U[live_U]))
    users.append(live_U)
    times.append(time_U[live_U].copy())
    gap_U = rng.exponential(mean_gap_U[live_U])
    p_move_U = 0.1 + 0.5 * (1.0 - np.exp(-gap_U / 86400.0))
    moves_U = rng.random(live_U.size) < p_move_U
    jumps_U = rng.random(live_U.size) < 0.2
    step_U = np.where(rng.random(live_U.size) < 0.5, 1, -1)
    new_U = np.where(jumps_U, rng.integers(0, n_topics, live_U.size),
                     (topic_U[live_U] + step_U) % n_topics)
    topic_U[live_U] = np.where(moves_U, new_U, topic_U[live_U])
    time_U[live_U] += np.maximum(gap_U, 1).astype(np.int64)
  return np.concatenate(users), np.concatenate(items), np.concatenate(times)


def generate(n_users: int = 2000, n_items: int = 1000, n_topics: int = 16,
             seed: int = 0) -> RawData:
  """The synthetic RawData: interactions, an item table and a 'text' embedding matrix."""
  for name, value, low in (('--users', n_users, 1), ('--items-count', n_items, 2),
                           ('--topics', n_topics, 1)):
    if value < low:
      raise PrepareError(f'{name}={value} is not allowed; it must be >= {low}')
  n_topics = min(n_topics, n_items)
  rng = np.random.default_rng(seed)
  topic_N = _item_topics(rng, n_items, n_topics)
  table = item_table(rng, topic_N, n_topics)
  embedding = text_embeddings(rng, topic_N, n_topics)
  users_E, items_E, times_E = user_events(rng, topic_sampler(rng, topic_N, n_topics),
                                          n_users, n_topics)
  order_E = np.lexsort((times_E, users_E))  # file order: by user, then time
  return RawData(users=np.array([f'user{u}' for u in users_E[order_E]]),
                 items=np.array([table.keys[i] for i in items_E[order_E]]),
                 timestamps=times_E[order_E].astype(np.int64), item_table=table,
                 embeddings={'text': embedding},
                 source=f'synthetic(users={n_users}, items={n_items}, topics={n_topics}, '
                        f'seed={seed})')

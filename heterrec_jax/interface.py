"""The interface every model (HeterRec and the baselines) offers to the loss, the trainer, the
evaluator and the exporter. `isinstance(model, RetrievalModel)` checks it at run time
(`tests/test_interface.py` checks every model).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import jax


@runtime_checkable
class RetrievalModel(Protocol):
  """A two-tower sequential retrieval model (SPEC 1, 7).

  `token_kinds`: (name, kind index, column offset, n_sub) of each token kind of the
  token-level loss (empty for the baselines). `horizon`: events after the input that a
  training window holds (`config.horizon`). Vectors are float32, L2-normalised under
  loss.scoring='cosine'.
  """
  token_kinds: tuple
  horizon: int

  def forward(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Training outputs of a batch of windows (the loss's inputs)."""

  def user_vector(self, items_BxT: jax.Array, tokens_BxTxS: jax.Array,
                  timestamps_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
    """`[B, d]`: the query vector after the last (right-aligned) input event."""

  def encode_items(self, items: jax.Array,
                   tokens: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """(item vectors `[..., d]`, per-token vectors `[..., K, d_f]` or None)."""

  def seen_weights(self) -> jax.Array | None:
    """The seen-item offsets `[seen.BUCKETS]` (`model.seen_bias`, `seen.py`), None when off."""

  def train(self, **attributes) -> None:
    """Training mode (dropout, Cloze masking on)."""

  def eval(self, **attributes) -> None:
    """Inference mode."""

"""A tiny setting for tests and smoke runs (seconds on a CPU).

    python -m heterrec_jax.train --config configs/tiny.py --workdir /tmp/tiny
"""

from heterrec_jax.config import (Config, DataConfig, EvalConfig, LossConfig, ModelConfig,
                                 OptimConfig, TrainConfig)


def get_config() -> Config:
  return Config(
      data=DataConfig(path='', max_len=6, synthetic_users=64, synthetic_items=62,
                      synthetic_topics=4),
      model=ModelConfig(d_f=16, d_k=16, heads=2, n1=1, n2=1, ffn_mult=1, dropout=0.1,
                        time_buckets=16),
      loss=LossConfig(n_step=2),
      optim=OptimConfig(lr=1e-3, warmup_steps=2),
      train=TrainConfig(steps=6, batch_size=16, eval_every=3, checkpoint_every=3,
                        log_every=1),
      eval=EvalConfig(batch_size=32, item_batch_size=32),
  )

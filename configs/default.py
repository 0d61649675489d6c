"""The main job: HeterRec on the built-in synthetic data, small enough for a laptop CPU.

    python -m heterrec_jax.train                      # same as --config configs/default.py
    python -m heterrec_jax.train train.steps=100      # a quick look

Under 10 minutes on 2 CPU cores; its test Recall@50 beats the popularity floor (README).
"""

from heterrec_jax.config import (Config, DataConfig, EvalConfig, LossConfig, ModelConfig,
                                 OptimConfig, TrainConfig)


def get_config() -> Config:
  return Config(
      data=DataConfig(path='', max_len=30, synthetic_users=2000, synthetic_items=1000),
      model=ModelConfig(d_f=32, d_k=32, heads=2, n1=1, n2=1, ffn_mult=2, dropout=0.1),
      loss=LossConfig(n_step=3),
      optim=OptimConfig(lr=2e-3, warmup_steps=50),
      train=TrainConfig(steps=600, batch_size=64, eval_every=200, checkpoint_every=200,
                        log_every=20),
      eval=EvalConfig(batch_size=256),
  )

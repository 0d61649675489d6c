"""HeterRec on MovieLens-100k (T = 50), from a folder prepared by

    python -m heterrec_jax.data.prepare --format recbole --input ../shared/data/ml-100k \\
        --embedding title=../shared/data/ml-100k/ml-100k.title_minilm384.npy --output data/ml100k
    python -m heterrec_jax.train --config configs/ml100k.py --workdir runs/ml100k

Figures and wall time: docs/results.md.
"""

from heterrec_jax.config import (Config, DataConfig, EvalConfig, LossConfig, ModelConfig,
                                 OptimConfig, TrainConfig)


def get_config() -> Config:
  return Config(
      data=DataConfig(path='data/ml100k', max_len=50),
      model=ModelConfig(d_f=64, d_k=64, heads=2, n1=2, n2=2, dropout=0.2),
      loss=LossConfig(n_step=3),
      optim=OptimConfig(lr=1e-3, warmup_steps=100),
      train=TrainConfig(steps=1500, batch_size=128, eval_every=250, checkpoint_every=250,
                        patience=3),
      eval=EvalConfig(batch_size=256),
  )

"""HeterRec on MovieLens-100k (T = 50), from a folder prepared by

    python -m heterrec_jax.data.prepare --format recbole --input ../shared/data/ml-100k \\
        --embedding title=../shared/data/ml-100k/ml-100k.title_minilm384.npy --output data/ml100k
    python -m heterrec_jax.train --config configs/ml100k.py --workdir runs/ml100k

Sized to train on a 2-core CPU in minutes (narrow widths, one block per level, 400 steps);
on an accelerator raise model.d_f/d_k to 64, model.n1/n2 to 2 and train.steps.
Figures and wall time: docs/results.md.
"""

from heterrec_jax.config import (Config, DataConfig, EvalConfig, LossConfig, ModelConfig,
                                 OptimConfig, TrainConfig)


def get_config() -> Config:
  return Config(
      data=DataConfig(path='data/ml100k', max_len=50),
      model=ModelConfig(d_f=32, d_k=32, heads=2, n1=1, n2=1, ffn_mult=2, dropout=0.2),
      loss=LossConfig(n_step=3),
      optim=OptimConfig(lr=2e-3, warmup_steps=40),
      train=TrainConfig(steps=400, batch_size=64, eval_every=100, checkpoint_every=100,
                        log_every=20),
      eval=EvalConfig(batch_size=256),
  )

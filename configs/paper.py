"""The paper's setting (SPEC sections 4, 6, 10): T = 256, N1 = N2 = 2, lambda_m = 1, N_step = 3.

    python -m heterrec_jax.train --config configs/paper.py data.path=DATA_DIR
    python -m heterrec_jax.bench train --config configs/paper.py train.batch_size=8

On a CPU-only host the step runs data-parallel over one XLA device per core
(train.cpu_devices=0): at these widths the token level's attention is batched matmuls of
[192, 32] x [32, 192] that XLA's CPU runtime runs on one thread, so one device leaves the other
cores idle through it (docs/benchmarks.md, "Thirty-first session": 0.82-0.94 s a step
against 0.94-1.10 s on one device, 2 cores, batch 16). train.cpu_devices=1 is the one-device
step. Accelerators ignore it.
"""

from heterrec_jax.config import (Config, DataConfig, LossConfig, ModelConfig, OptimConfig,
                                 TrainConfig)


def get_config() -> Config:
  return Config(
      data=DataConfig(max_len=256),
      model=ModelConfig(d_f=64, d_k=64, heads=2, n1=2, n2=2, dropout=0.2),
      loss=LossConfig(n_step=3, lambda_m=1.0, tau=0.05, null_logit_c=1.0),
      optim=OptimConfig(lr=1e-3, warmup_steps=1000, clip_norm=1.0),
      train=TrainConfig(steps=20000, batch_size=128, eval_every=2000, checkpoint_every=2000,
                        patience=5, cpu_devices=0),
  )

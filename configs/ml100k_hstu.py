"""HSTU on MovieLens-100k as its public code trains SASRec-style models on ML-1M: 128 negatives
drawn uniformly from the catalogue per step, L2-normalised vectors, tau 0.05, dropout 0.2;
d = 64, 2 layers, 2 heads. Every training target once per epoch ('all' windows of T + 1).

    python -m heterrec_jax.train --config configs/ml100k_hstu.py --workdir runs/ml100k_hstu
"""

import dataclasses
import pathlib

from heterrec_jax.config import Config, load_config


def sasrec_config() -> Config:
  return load_config(str(pathlib.Path(__file__).with_name('ml100k_sasrec.py')))


def get_config() -> Config:
  cfg = sasrec_config()
  return dataclasses.replace(
      cfg, model=dataclasses.replace(cfg.model, name='hstu', dropout=0.2),
      loss=dataclasses.replace(cfg.loss, negatives='uniform', n_uniform=128, scoring='cosine',
                               tau=0.05))

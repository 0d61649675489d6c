"""BERT4Rec on MovieLens-100k as RecBole 1.2.1 trains it: d = 64, 2 layers, 2 heads, GELU FFN
4x, dropout 0.2 (hidden and attention), Cloze with mask ratio 0.2 and a full softmax over all
items with raw dot products, Adam 1e-3. Windows of T events cover every training event once
per epoch ('all', horizon 0).

    python -m heterrec_jax.train --config configs/ml100k_bert4rec.py --workdir runs/ml100k_bert4rec

No label smoothing on the Cloze softmax (twentieth session, patience 10 as SASRec's file; seed
0, validation nDCG@10 / Recall@50 / nDCG@50): 0.0678 / 0.4274 / 0.1292 without, 0.0680 /
0.4221 / 0.1286 at 0.1, 0.0699 / 0.3977 / 0.1255 at 0.3 (Recall@50 -7%).
"""

import dataclasses
import pathlib

from heterrec_jax.config import Config, load_config


def sasrec_config() -> Config:
  return load_config(str(pathlib.Path(__file__).with_name('ml100k_sasrec.py')))


def get_config() -> Config:
  cfg = sasrec_config()
  # SASRec's label smoothing and third layer were chosen for SASRec; BERT4Rec's grid kept 0
  # (docstring) and BERT4Rec keeps RecBole's 2 layers (n1 + n2).
  return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name='bert4rec',
                                                            dropout=0.2, n1=1, n2=1),
                             loss=dataclasses.replace(cfg.loss, label_smoothing=0.0))

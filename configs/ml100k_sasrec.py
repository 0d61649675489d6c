"""SASRec on MovieLens-100k as RecBole 1.2.1 trains it (SPEC 8), from a folder prepared by

    python -m heterrec_jax.data.prepare --format recbole --input ../shared/data/ml-100k \\
        --embedding title=../shared/data/ml-100k/ml-100k.title_minilm384.npy --output data/ml100k
    python -m heterrec_jax.train --config configs/ml100k_sasrec.py --workdir runs/ml100k_sasrec

RecBole's settings: d = 64, 2 layers, 2 heads, GELU FFN 4x, dropout 0.5 (hidden and attention),
T = 50, cross-entropy over all items with raw dot products, Adam lr 1e-3 (no decay, no
clipping); this file has 3 layers (below). Ours differs where windows make it cheaper: every
training target once per epoch in windows of T + 1 ('all') 25 apart, each counting the targets
of its last 25 inputs (so every target has >= 25 events of context; stride 25 beat stride 50 on
validation nDCG@10, 0.0685 vs 0.0671, one seed each), batches of 64 windows (validation nDCG@10
at the best checkpoint, seed 0: batch 32 0.0644, 64 0.0715, 128 0.0685); early stopping on
validation nDCG@10.
Label smoothing 0.3 on the catalogue softmax (nineteenth session; RecBole's SASRec has none):
validation over 3 seeds nDCG@10 0.0724 against 0.0704 (+2.8%, each seed higher), Recall@50
+2.1%, nDCG@50 +2.0%; 0.1 and 0.5 were lower than 0.3 on seed 0 (0.0726 and 0.0694 against
0.0730). `loss.label_smoothing=0` is RecBole's loss.
Patience 10 validations, RecBole's `stopping_step` (twentieth session; was 5): on validation
over 3 seeds nDCG@10 0.0726 against 0.0724, Recall@50 0.4577 against 0.4510, nDCG@50 0.1372
against 0.1358 (two seeds stop at the same best step; seed 2's best moves from step 1,000 to
1,900); on Toys (configs/toys_sasrec.py, two seeds) nDCG@10 +5.1%, nDCG@50 +2.9%, Recall@50
-0.5%. Longer runs: at most 4,000 steps, about 3,000 on ml-100k.
Three layers (n1 + n2 = 1 + 2; RecBole's SASRec has 2; twenty-seventh session): on validation
over 3 seeds nDCG@10 0.0746 against 0.0726 (+2.8%), Recall@50 0.4592 against 0.4577 (+0.3%),
nDCG@50 0.1385 against 0.1372 (+1.0%); the third layer learns later (two seeds reach the 4,000-step
cap, best at steps 3,900 and 4,000). On Toys it was not higher (one seed, twenty-eighth
session; configs/toys_sasrec.py keeps 2), and the baselines built on this file
(configs/ml100k_{hstu,bert4rec,pinnerformer}.py) keep 2.
`model.n2=1` is RecBole's architecture.
Figures and wall time: docs/results.md.
"""

from heterrec_jax.config import (Config, DataConfig, EvalConfig, LossConfig, ModelConfig,
                                 OptimConfig, TrainConfig)


def get_config() -> Config:
  return Config(
      data=DataConfig(path='data/ml100k', max_len=50, window='all', stride=25),
      model=ModelConfig(name='sasrec', d_k=64, d_f=64, heads=2, n1=1, n2=2, ffn_mult=4,
                        dropout=0.5),
      loss=LossConfig(negatives='all', scoring='dot', tau=1.0, label_smoothing=0.3),
      optim=OptimConfig(lr=1e-3, warmup_steps=0, schedule='constant', clip_norm=0.0, b2=0.999),
      train=TrainConfig(steps=4000, batch_size=64, eval_every=100, patience=10,
                        checkpoint_every=100, log_every=20),
      eval=EvalConfig(batch_size=256),
  )

"""HeterRec on MovieLens-100k (T = 50), from a folder prepared by

    python -m heterrec_jax.data.prepare --format recbole --input ../shared/data/ml-100k \\
        --embedding title=../shared/data/ml-100k/ml-100k.title_minilm384.npy --output data/ml100k
    python -m heterrec_jax.train --config configs/ml100k.py --workdir runs/ml100k

The protocol of the baselines' configs (configs/ml100k_*.py): every training target once per
epoch ('all' windows of T + N_step 25 apart, each counting the targets of its last 25 inputs, so
every target has >= 25 events of context, as configs/ml100k_sasrec.py), a softmax over the
whole catalogue with raw dot products, Adam at a constant 1e-3, early stopping on validation
nDCG@10. Model: d = 64 (d_f = 32), N1 = 1, N2 = 2, dropout 0.6 (input 0.2), with the two
options that carry to any dataset with item ids (a free per-item vector in V, item-level
positions).

Chosen on validation (seed 0, best nDCG@10 / Recall@50; docs/results.md):
  * N2 = 2 beat N2 = 1 (these two at 700 steps of 128 whole windows): 0.0641 / 0.4242
    against 0.0571 / 0.4157. Under this protocol (thirteenth session, 3 seeds) the two are level
    on validation (0.0705 / 0.4362 for N2 = 1 against 0.0685 / 0.4411), so N2 stays 2.
  * loss.n_step = 1 (the next-item step of LMP with its token level, no later steps, so no
    margin gate) beat the paper's N_step = 3: 0.0666 / 0.4337 against 0.0642 / 0.4210. On
    Amazon Toys, N_step = 3 learned at half the speed (validation nDCG@10 0.0094 against
    0.0183 after 700 steps). Thirteenth session, 3 seeds: N_step 3 0.0635 / 0.4284 against
    N_step 1's 0.0685 / 0.4411. The paper's setting stays in configs/paper.py and is
    `loss.n_step=3` here.
  * data.stride = 25 with batches of 64 beat the whole windows (stride 50) at batch 128 that
    the file had: 0.0730 / 0.4454 at step 1,300 against 0.0666 / 0.4337; batch 64 at stride 50
    gave 0.0633 / 0.4433 (stride 25 at batch 128 was not run). At stride 25, loss.w_tok = 0 gave
    0.0667 / 0.4380 (the token level is kept at 0.1) and the tied id input
    (model.item_id_input) 0.0737 / 0.4380 (one seed's noise: not taken); dropout 0.3 gave
    0.0689 / 0.4422 against the file's 0.0723 / 0.4433 (seed 0 of its 3-seed run).
  * N1 x N2 (fourteenth session, 3 seeds, Figure 3 in docs/results.md): 1x1, 1x2, 2x2 and 3x3
    are level on validation (Recall@50 0.436 / 0.441 / 0.444 / 0.443, nDCG@10 0.0705 / 0.0685
    / 0.0680 / 0.0678, each within one standard error of 1x2), so 1x2 stays.
    On the file now (twenty-first session, 3 seeds): 1x1 / 1x2 / 2x2 at validation nDCG@10
    0.0727 / 0.0734 / 0.0730, Recall@50 0.4450 / 0.4493 / 0.4560: 1x2 stays (2x2 lower at
    nDCG@10, twice the wall time). 1x3, the analogue of SASRec's third layer (twenty-eighth
    session, 3 seeds): 0.0694 / 0.4415, lower on every column than 1x2's 0.0734 / 0.4493.
  * (fifth session) the free per-item vector starts at N(0, 0.02), not 0.125 (a model change,
    not a field): ml-100k validation nDCG@10 over 3 seeds 0.0693 against 0.0694, Amazon Toys
    +31% at step 1,500. optim.ema=0.995 was measured and is not used (docs/results.md).
  * The token level over the whole catalogue too (loss.token_negatives empty = 'all', SPEC 6's
    default; seventeenth session, 3 seeds): it had 128 uniform items ('uniform') while an
    unchunked 'all' cost [steps, B, T, items] logits per kind; now each kind's softmax runs
    over its distinct tokens in chunks. Validation nDCG@10 0.0698 against 0.0685, Recall@50
    0.4436 against 0.4411, nDCG@50 0.1339 against 0.1332 (small, every column up); w_tok 0.3
    with it was lower on both seeds run (0.0681 / 0.0659 against 0.0685 / 0.0699).
  * Label smoothing 0.1 on the item level's catalogue softmax (nineteenth session, 3 seeds):
    validation nDCG@10 0.0730 against 0.0698 (+4.6%, each seed higher), Recall@50 level
    (0.4440 against 0.4436), nDCG@50 +1.4%; 0.3 was lower on seed 0 (0.0701 against 0.0707).
  * Dot products at tau 1 stay (twenty-first session, seed 0): cosine scores at tau 0.05, with
    the catalogue softmax or with PinnerFormer's item-level loss (mixed + log-Q), were lower at
    validation nDCG@10, Recall@50 and nDCG@50; early stopping on nDCG@50 picked the same
    checkpoint as on nDCG@10.
  * Not taken (twenty-eighth session, 3 seeds, validation means against the file's 0.0734 /
    0.4493 / 0.1382 at nDCG@10 / Recall@50 / nDCG@50): model.token_dropout=0.2 (the item level
    keeping 0.5) 0.0712 / 0.4454 / 0.1358, model.item_input_norm 0.0705 / 0.4464 / 0.1342.
  * The seen-item term (model.seen_bias, thirty-second session, 3 seeds; seen.py): a learned
    offset on the logits of the query's own inputs, by recency. Validation nDCG@10 / Recall@50
    / nDCG@50 0.1153 / 0.5253 / 0.1825 against 0.0729 / 0.4454 / 0.1375 (+58% / +18% / +33%,
    every seed higher on every column); it learns w of about -4.5 to -5 for the latest inputs
    (ml-100k users rate a movie once, so an input is never the next item). It is not a
    HeterRec component: SASRec with the same term gains as much (validation +73% / +16% /
    +41%) and stays ahead of HeterRec (docs/results.md); the baselines' files keep their
    reference form. `model.seen_bias=false model.dropout=0.5 model.input_dropout=0
    train.steps=2000` is the file before; Table 2's "w/o seen-item term" (thirty-third session:
    Table 2 with the term, 3 seeds, on the file's dropout 0.5).
  * With the term (thirty-third session, seed 0, validation nDCG@10 / Recall@50 / nDCG@50
    against the file's 0.1102 / 0.5164 / 0.1772): patience 10 with at most 3,000 steps 0.1170 /
    0.5069 / 0.1800 (lower at Recall@50), label smoothing 0.3 0.1051 / 0.5016 / 0.1718: not
    taken.
  * Dropout 0.6 with at most 3,000 steps (thirty-fourth session, 3 seeds): with the term the
    file's validation Recall@50 fell after about 1,900 steps while nDCG@10 levelled off; more
    dropout at the longer cap gave validation nDCG@10 / Recall@50 / nDCG@50 0.1165 / 0.5309 /
    0.1838 against 0.1153 / 0.5253 / 0.1825 (+1.1% / +1.1% / +0.7%; inside the draw of the
    943 users: `experiments paired`, 68% / 83% / 72% of resamples ahead). Dropout 0.6 at the
    old 2,000-step cap was level (+0.2% / +0.8% / +0.3%); the longer cap alone changes nothing
    at 0.5 (its seeds stop by patience first: Figure 3's 1x2 runs); dropout 0.7 was lower on
    every column (two seeds: -4.2% / -1.1% / -3.8%). On Toys more dropout (0.3 against the
    Toys file's 0.2) was not taken (twenty-ninth session).
  * Not taken (thirty-fifth session, seed 0 against the file's seed 0 run on the same machine,
    0.1167 / 0.5196 / 0.1828): the tied id input (model.item_id_input), w_tok 0, attention
    dropout 0.2, lr 5e-4, label smoothing 0.2, weight decay 0.1, d_f 64, patience 10 with 4,000
    steps, SASRec's training settings together (label smoothing 0.3, dropout 0.5, patience 10,
    4,000 steps), token-level dropout 0.7: none higher at all three columns (docs/results.md,
    "Thirty-fifth session").
  * Input dropout 0.2 with at most 4,000 steps (thirty-fifth session, 3 seeds; model.input_dropout,
    on the HTFL tokens and the item-level input, as configs/toys.py has had since the fifteenth
    session): validation nDCG@10 / Recall@50 / nDCG@50 0.1228 / 0.5267 / 0.1876 against the file's
    0.1150 / 0.5253 / 0.1825 on the same machine (+6.8% / +0.3% / +2.8%; paired over users, 99% /
    59% / 97% of resamples ahead). It learns more slowly (best steps 3,000-3,600), hence the cap.
    `model.input_dropout=0.0 train.steps=3000` is the file before.
At most 4,000 steps (72 epochs), early stopping ends it sooner; the 15-minute budget of a
2-core CPU holds it (docs/results.md has the wall times). On an accelerator raise train.steps
and let early stopping end the run. The baselines: use their own files
(configs/ml100k_*.py; their widths and dropout differ).
"""

from heterrec_jax.config import (Config, DataConfig, EvalConfig, LossConfig, ModelConfig,
                                 OptimConfig, TrainConfig)


def get_config() -> Config:
  return Config(
      data=DataConfig(path='data/ml100k', max_len=50, window='all', stride=25),
      model=ModelConfig(d_f=32, d_k=64, heads=2, n1=1, n2=2, ffn_mult=4, dropout=0.6,
                        input_dropout=0.2, item_id_vector=True, item_positions=True,
                        seen_bias=True),
      loss=LossConfig(n_step=1, negatives='all', scoring='dot', tau=1.0, w_tok=0.1,
                      label_smoothing=0.1),
      optim=OptimConfig(lr=1e-3, warmup_steps=0, schedule='constant', clip_norm=0.0, b2=0.999),
      train=TrainConfig(steps=4000, batch_size=64, eval_every=100, patience=5,
                        checkpoint_every=100, log_every=20),
      eval=EvalConfig(batch_size=256),
  )

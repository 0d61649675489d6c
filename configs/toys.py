"""HeterRec on Amazon Toys (S3-Rec's preprocessing: 19k sparse users, 12k attribute-rich items),
from a folder prepared by

    python -m heterrec_jax.data.prepare --format csv \\
        --input ../shared/data/s3rec-toys/interactions.csv \\
        --items ../shared/data/s3rec-toys/items.csv --user-col user_id --item-col item_id \\
        --time-col timestamp --multi attributes --output data/toys
    python -m heterrec_jax.train --config configs/toys.py --workdir runs/toys

configs/ml100k.py with what sparse data changes, each chosen on Toys validation (docs/results.md,
"Seventh session: dropout, width and the token-level stage on Toys", one seed, and "Eighth
session: one item-level block on Toys"):
  * T = 20, windows 10 apart (90% of users have at most 14 events).
  * dropout 0.2, not ml-100k's 0.5: validation nDCG@10 +36% at step 1,000 and +4% at the best
    of 3,000 steps (0.0437 against 0.0421). On dense ml-100k 0.2 overfits (results.md).
  * d_f = 64, not 32: +16% nDCG@10 at step 1,000 and +9% at the best of 3,000 steps (0.0478
    against 0.0437, both at dropout 0.2). On ml-100k it did not help (results.md).
  * N2 = 1 item-level block, not 2 (eighth session, two seeds): validation nDCG@10 +6.5%
    (0.0507 against 0.0476; each seed higher), nDCG@50 +1.5%, but Recall@50 -4.4% (0.1682
    against 0.1759): chosen on nDCG@10 like every other value here. On ml-100k two blocks
    beat one (results.md).
  * optim.weight_decay = 0.1 (AdamW on every parameter; ninth session, two seeds): validation
    nDCG@10 +4.4% (0.0530 against 0.0507), Recall@50 +1.9%, nDCG@50 +3.3%, each seed higher
    on each. configs/toys_sasrec.py has it too (tenth session).
  * model.input_dropout = 0.2 (fifteenth session, two seeds; "Fifteenth session" in
    docs/results.md; configs/ml100k.py took the same value in the thirty-fifth session):
    dropout on the stacks' inputs, as SASRec drops its input embeddings.
    Without it HeterRec's validation Recall@50 peaks near step 1,500 and falls while nDCG@10
    still rises (best 2,600, early stop 3,100); with it the model learns more slowly and
    further: best step 4,900 on both seeds, validation nDCG@10 +2.8% (0.0545 against 0.0530),
    Recall@50 +6.4% (0.1823 against 0.1714), nDCG@50 +4.5%, each seed higher on each. 0.1
    and 0.5 were lower on seed 0. On ml-100k it is not used (results.md).
  * model.attention_dropout = 0.2 (sixteenth session, two seeds; "Sixteenth session" in
    docs/results.md): dropout on the attention probabilities, as SASRec's blocks have (0.2
    here, the blocks' own rate). Validation nDCG@10 +2.2% (0.0557 against 0.0545), Recall@10
    +3.6%, nDCG@50 +1.1%, Recall@50 +0.9%; each seed higher on nDCG@10, Recall@10 and
    nDCG@50. From the item ids alone it gained more (+7% nDCG@10, one seed). On ml-100k 0.5
    (its blocks' rate) was lower on every seed: not used there.
  * loss.token_negatives = 'uniform' (128 items drawn per step), kept where ml-100k moved to
    the whole catalogue in the seventeenth session: on Toys the token level over all 2,911
    distinct attribute sets was mixed on validation (two seeds: nDCG@10 +0.9%, 0.0562 against
    0.0557; Recall@50 -1.8%, 0.1808 against 0.1840; nDCG@50 +0.2%).
  * Label smoothing 0.3 (twenty-third session, two seeds; "Twenty-third session" in
    docs/results.md), as configs/toys_sasrec.py has; ml-100k keeps 0.1 (0.3 on one seed and
    0.2 on two were lower there). Against 0.1 (nineteenth session, which had lifted Toys
    validation nDCG@10 by 6.2% over none): validation nDCG@10 0.0599 against 0.0591 (+1.4%),
    Recall@50 0.1898 against 0.1839 (+3.2%), nDCG@50 0.0801 against 0.0785 (+2.0%); seed 0
    higher on all three, seed 1 level (-0.5%, +1.3%, +0.6%); a third seed, run after the
    choice, level too (three-seed means +0.7%, +2.7%, +1.4%). The breadth is where HeterRec
    trails SASRec on Toys.
  * Not taken (twenty-ninth session; validation against the file's seeds, docs/results.md
    "Twenty-ninth session"): model.n2=2, loss.label_smoothing=0.5, loss.w_tok=0.3 and 1.0 and
    optim.lr=2e-3 (seed 0 each) raised Recall@50 by 1.1-2.4% and lowered nDCG@10 by 0.7-9.3%;
    model.v_features=false, with or without model.item_id_input, was lower on all three;
    model.dropout=0.3 over two seeds: nDCG@10 +2.3%, Recall@50 -0.3%, nDCG@50 +1.2% (not higher
    on all three; a third seed run after the decision left the means level, +0.3% to +0.7%).
  * model.seen_bias, inherited from configs/ml100k.py (thirty-second session, two seeds,
    "Thirty-second session" in docs/results.md): validation nDCG@10 / Recall@50 / nDCG@50
    0.0631 / 0.1959 / 0.0834 against 0.0591 / 0.1899 / 0.0793 (+6.7% / +3.2% / +5.1%), each
    seed higher on each.
Width and dropout are SPEC section 10's defaults (d_f = d_k = 64, dropout 0.2): start a new
sparse dataset here, a dense one at configs/ml100k.py, and choose on its validation split. At
most 6,000 steps (18 epochs); both seeds of the file now run to 6,000 or near it (best steps
5,900 and 5,500; 27-40 minutes of a 2-core CPU shared with another run): on an accelerator
raise train.steps and let early stopping end the run.
"""

import dataclasses
import pathlib

from heterrec_jax.config import Config, load_config


def get_config() -> Config:
  cfg = load_config(str(pathlib.Path(__file__).with_name('ml100k.py')))
  return dataclasses.replace(
      cfg,
      data=dataclasses.replace(cfg.data, path='data/toys', max_len=20, stride=10),
      model=dataclasses.replace(cfg.model, d_f=64, n2=1, dropout=0.2, input_dropout=0.2,
                                attention_dropout=0.2),
      loss=dataclasses.replace(cfg.loss, token_negatives='uniform', label_smoothing=0.3),
      optim=dataclasses.replace(cfg.optim, weight_decay=0.1),
      train=dataclasses.replace(cfg.train, steps=6000))

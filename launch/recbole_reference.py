#!/usr/bin/env python3
"""RecBole 1.2.1's SASRec on MovieLens-100k with the settings of issue 8: the reference figures
that docs/results.md puts beside ours.

    python -m venv --system-site-packages /tmp/rb
    /tmp/rb/bin/pip install recbole==1.2.1 torch "colorlog==4.7.2" "colorama==0.4.4" \\
        tensorboard thop tabulate plotly texttable ray
    /tmp/rb/bin/python launch/recbole_reference.py --data ../shared/data/ml-100k --seed 2020 \\
        --out runs/recbole/seed2020

RecBole and torch are not dependencies of this project (it never imports them); this script
runs in its own environment. Settings (RecBole's names): hidden_size 64, inner_size 256,
n_layers 2, n_heads 2, hidden and attention dropout 0.5, GELU, layer_norm_eps 1e-12,
initializer_range 0.02, cross-entropy over all items (loss_type CE, no negative sampling),
MAX_ITEM_LIST_LENGTH 50, train_batch_size 256, Adam lr 1e-3, 20 epochs with RecBole's own
early stopping (stopping_step 10 on its default valid_metric MRR@10), leave-one-out split in
time order (LS valid_and_test, TO), full-corpus ranking, Recall/NDCG/MRR at 10 and 50.
Writes OUT/results.json: the best validation and the test figures, the epochs and wall time;
RecBole's own log, tensorboard files and checkpoint stay in OUT too.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--data', required=True,
                      help='the folder holding ml-100k.inter (RecBole atomic files)')
  parser.add_argument('--seed', type=int, default=2020, help='RecBole seed (default 2020)')
  parser.add_argument('--out', required=True, help='folder for results.json and the checkpoint')
  parser.add_argument('--epochs', type=int, default=20, help='training epochs (default 20)')
  parser.add_argument('--threads', type=int, default=0,
                      help='torch CPU threads (default 0: torch decides)')
  return parser.parse_args(argv)


def recbole_config(args: argparse.Namespace, out: pathlib.Path) -> dict:
  data = pathlib.Path(args.data).resolve()
  return {
      'data_path': str(data.parent), 'checkpoint_dir': str(out / 'saved'),
      'seed': args.seed, 'reproducibility': True, 'use_gpu': False, 'show_progress': False,
      'hidden_size': 64, 'inner_size': 256, 'n_layers': 2, 'n_heads': 2,
      'hidden_dropout_prob': 0.5, 'attn_dropout_prob': 0.5, 'hidden_act': 'gelu',
      'layer_norm_eps': 1e-12, 'initializer_range': 0.02,
      'loss_type': 'CE', 'train_neg_sample_args': None, 'MAX_ITEM_LIST_LENGTH': 50,
      'train_batch_size': 256, 'eval_batch_size': 4096, 'learning_rate': 1e-3,
      'epochs': args.epochs,
      'eval_args': {'split': {'LS': 'valid_and_test'}, 'order': 'TO', 'mode': 'full',
                    'group_by': 'user'},
      'metrics': ['Recall', 'NDCG', 'MRR'], 'topk': [10, 50],
  }


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  data = pathlib.Path(args.data)
  if not (data / f'{data.resolve().name}.inter').is_file():
    print(f'error: --data {data}: no {data.resolve().name}.inter there', file=sys.stderr)
    return 2
  out = pathlib.Path(args.out)
  if (out / 'results.json').exists():
    print(f'error: --out {out} already holds results.json; choose another folder',
          file=sys.stderr)
    return 2
  # RecBole 1.2.1 saves its checkpoint with pickled metadata that torch >= 2.6 only loads with
  # weights_only off; the file is the one this run just wrote.
  os.environ.setdefault('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', '1')
  try:
    import numpy as np
    for alias, real in (('bool8', np.bool_), ('float_', np.float64), ('complex_', np.complex128),
                        ('unicode_', np.str_)):
      if not hasattr(np, alias):  # RecBole 1.2.1 predates NumPy 2 (it re-aliases these)
        setattr(np, alias, real)
    import torch
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_model, get_trainer, init_logger, init_seed
  except ImportError as error:
    print(f'error: {error}; install RecBole and torch as this script\'s docstring says',
          file=sys.stderr)
    return 2
  if args.threads:
    torch.set_num_threads(args.threads)
  out = out.resolve()
  out.mkdir(parents=True, exist_ok=True)
  config_dict = recbole_config(args, out)  # absolute paths: RecBole runs inside OUT
  os.chdir(out)  # RecBole writes ./log and ./log_tensorboard wherever it runs
  start = time.time()
  config = Config(model='SASRec', dataset=data.resolve().name,
                  config_dict=config_dict)
  init_seed(config['seed'], config['reproducibility'])
  init_logger(config)
  dataset = create_dataset(config)
  train_data, valid_data, test_data = data_preparation(config, dataset)
  init_seed(config['seed'] + config['local_rank'], config['reproducibility'])
  model = get_model(config['model'])(config, train_data._dataset).to(config['device'])
  trainer = get_trainer(config['MODEL_TYPE'], config['model'])(config, model)
  _, best_valid = trainer.fit(train_data, valid_data, saved=True, show_progress=False)
  test = trainer.evaluate(test_data, load_best_model=True, show_progress=False)
  wall = time.time() - start
  result = {'best_valid_result': best_valid, 'test_result': test}
  summary = {
      'seed': args.seed, 'epochs': args.epochs, 'wall_seconds': round(wall, 1),
      'best_valid': {k: float(v) for k, v in result['best_valid_result'].items()},
      'test': {k: float(v) for k, v in result['test_result'].items()},
      'recbole': __import__('recbole').__version__, 'torch': torch.__version__,
  }
  (out / 'results.json').write_text(json.dumps(summary, indent=1) + '\n')
  print(json.dumps(summary, indent=1))
  return 0


if __name__ == '__main__':
  sys.exit(main())

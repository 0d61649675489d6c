"""Raw tables as the readers produce them, before tokenisation (SPEC section 2).

Every reader (`readers.py`) and the synthetic source (`synthetic.py`) return a `RawData`;
`prepare.py` sorts, filters and tokenises it into a dataset folder.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Column types, as RecBole's atomic files name them.
TOKEN = 'token'  # one categorical value
TOKEN_SEQ = 'token_seq'  # several categorical values (multi-valued)
FLOAT = 'float'  # a number; None or NaN is missing


class PrepareError(ValueError):
  """Bad input to preparation (a malformed line, a missing column, an empty table, a bad
  option): the message is one line naming the file and line, the column or the flag."""


@dataclasses.dataclass
class Column:
  type: str  # TOKEN, TOKEN_SEQ or FLOAT
  # One entry per item row: str (TOKEN), tuple[str, ...] (TOKEN_SEQ), float (FLOAT; nan missing).
  # A TOKEN or TOKEN_SEQ entry may be None (missing).
  values: list


@dataclasses.dataclass
class ItemTable:
  keys: list[str]  # original item ids, in file order
  columns: dict[str, Column]  # feature columns by name, in file order (no id column)
  missing: int = 0  # rows of the item file dropped for an empty or null id (--drop-missing-ids)


@dataclasses.dataclass
class RawData:
  users: np.ndarray  # [E] original user ids (str or int), in file order
  items: np.ndarray  # [E] original item ids (str), in file order
  timestamps: np.ndarray  # [E] int64 unix seconds
  item_table: ItemTable
  # Multimodal matrices by feature name: float [len(item_table.keys), d], rows in item-table order.
  embeddings: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  source: str = ''  # what was read, for messages and the report
  time_unit: str = 's'  # unit the numeric timestamps were read in ('s', 'ms' or 'us')
  missing_id_events: int = 0  # event rows dropped for an empty or null id (--drop-missing-ids)
  missing_id_item_rows: int = 0  # item-file rows dropped for an empty or null id

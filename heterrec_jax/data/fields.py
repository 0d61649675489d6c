"""What every reader shares (SPEC section 2): opening (gzipped) text files with numbered lines
and a progress bar, ids (missing ids, line breaks), timestamps (units, range), prices and token
values, the event log readers fill, and the item table they return. Bad values raise
`PrepareError` with `FILE:LINE: reason`.
"""

from __future__ import annotations

import datetime
import gzip
import math
import pathlib
import re
import sys
from typing import Any, Iterator

import numpy as np
import tqdm

from heterrec_jax.data.raw import FLOAT, Column, ItemTable, PrepareError, RawData

BAR_EVERY = 4096  # lines between progress-bar updates
MULTI_SEPS = ('|', ',', ';')  # separators looked for when --multi-sep is not found
TIME_UNITS = ('auto', 's', 'ms', 'us')
UNIT_FACTORS = {'s': 1, 'ms': 1000, 'us': 1_000_000}
AUTO_MS, AUTO_US = 1e11, 1e14  # auto-detection thresholds on the largest raw timestamp
MAX_SECONDS = 7_258_118_400  # 2200-01-01 UTC: later timestamps are errors
MAX_RAW_STAMP = MAX_SECONDS * 1_000_000  # beyond 2200 even in microseconds
# Id texts read as missing (compared lower-cased, after stripping blanks).
MISSING_IDS = frozenset({'', 'null', 'none', 'nan', 'na', 'n/a'})
# Everything str.splitlines() splits on: an id holding one would shift the lines of the
# item_keys.txt / user_keys.txt files.
LINE_BREAK = re.compile('[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]')


# ---------------------------------------------------------------------------------------------
# Files, lines and values.


def open_text(path: str | pathlib.Path, encoding: str = 'utf-8'):
  """A text stream of `path` (gunzipped when it ends in .gz); lines keep their endings."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise PrepareError(f'{path}: no such file')
  if path.suffix == '.gz':
    return gzip.open(path, 'rt', encoding=encoding, newline='')
  return open(path, encoding=encoding, newline='')  # pylint: disable=consider-using-with


def progress_bar(path: pathlib.Path, progress: bool) -> tqdm.tqdm:
  return tqdm.tqdm(desc=path.name, unit=' lines', unit_scale=True, file=sys.stderr,
                   disable=not (progress and sys.stderr.isatty()), mininterval=0.5)


def numbered_lines(path: str | pathlib.Path, *, encoding: str = 'utf-8',
                   progress: bool = True) -> Iterator[tuple[int, str]]:
  """Yields (line number from 1, line without its end) of a text file, with a progress bar."""
  path = pathlib.Path(path)
  line_no = 0
  with open_text(path, encoding) as f, progress_bar(path, progress) as bar:
    try:
      for line_no, line in enumerate(f, 1):
        if line_no % BAR_EVERY == 0:
          bar.update(BAR_EVERY)
        text = line.rstrip('\r\n')
        yield line_no, text.lstrip('\ufeff') if line_no == 1 else text  # a BOM is no text
    except UnicodeDecodeError as e:
      raise PrepareError(f'{path}:{line_no + 1}: not {encoding} text ({e.reason})') from None
    except (OSError, EOFError) as e:  # a truncated or corrupt .gz
      raise PrepareError(f'{path}:{line_no + 1}: cannot read ({e})') from None


def to_seconds(value: Any, where: str, unit: str = 's') -> int:
  """Unix seconds from one timestamp: a number in `unit` ('s', 'ms' or 'us'), a numeric string,
  an ISO date or date-time (UTC unless it says otherwise) or a datetime; checked to lie in
  [1970, 2200)."""
  number, is_seconds = parse_stamp(value, where)
  seconds = number if is_seconds else int(number // UNIT_FACTORS[unit])
  check_seconds(seconds, value, where)
  return seconds


def parse_stamp(value: Any, where: str) -> tuple[int | float, bool]:
  """(number, True when it is already seconds: a date) of one raw timestamp; non-finite,
  negative and absurdly large values are errors."""
  if isinstance(value, datetime.datetime):
    return int(as_utc(value).timestamp()), True
  if isinstance(value, datetime.date):
    return int(as_utc(datetime.datetime(value.year, value.month, value.day)).timestamp()), True
  if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
    number = value.item() if isinstance(value, np.generic) else value
  else:
    number = parse_number(str(value))
    if number is None:
      return iso_seconds(str(value), where), True
  if isinstance(number, float) and not math.isfinite(number):
    raise PrepareError(f'{where}: timestamp {value!r} is not a finite number')
  if number < 0 or number > MAX_RAW_STAMP:
    raise PrepareError(f'{where}: timestamp {value!r} is out of range (negative or beyond '
                       'the year 2200 in every unit)')
  return number, False


def check_seconds(seconds: int, value: Any, where: str) -> None:
  if not 0 <= seconds < MAX_SECONDS:
    raise PrepareError(f'{where}: timestamp {value!r} is {seconds} s, outside 1970..2200; '
                       'check --time-unit')


def detect_unit(numbers: np.ndarray) -> str:
  """The unit of numeric timestamps from their largest magnitude: > 1e14 us, > 1e11 ms
  (1e11 s is the year 5138), else seconds."""
  top = float(np.max(numbers, initial=0.0))
  return 'us' if top > AUTO_US else 'ms' if top > AUTO_MS else 's'


def clean_id(value: Any, what: str, where: str) -> str | None:
  """An id as single-line text; None when missing (None, NaN, empty, or one of MISSING_IDS)."""
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return None
  text = str(value).strip()
  if text.lower() in MISSING_IDS:
    return None
  if LINE_BREAK.search(text):
    raise PrepareError(f'{where}: {what} id {text!r} holds a line break; ids must be '
                       'single-line text')
  return text


class EventLog:
  """The events of one file as they are read: ids checked, timestamps kept raw until the unit
  is known (`raw_data`). Rows are numbered as lines, or as rows (Parquet)."""

  def __init__(self, path: pathlib.Path, drop_missing_ids: bool, unit: str,
               rows: bool = False):
    if unit not in TIME_UNITS:
      raise PrepareError(f'--time-unit={unit!r} is not allowed; use one of {TIME_UNITS}')
    self.path, self.drop, self.unit, self.rows = path, drop_missing_ids, unit, rows
    self.users, self.items, self.stamps, self.dates, self.lines = [], [], [], [], []
    self.missing = 0

  def where(self, line: int) -> str:
    return f'{self.path}: row {line}' if self.rows else f'{self.path}:{line}'

  def add(self, user: Any, item: Any, stamp: Any, line: int) -> None:
    where = self.where(line)
    ids = clean_id(user, 'user', where), clean_id(item, 'item', where)
    if None in ids:
      if self.drop:
        self.missing += 1
        return
      what = 'user' if ids[0] is None else 'item'
      raise PrepareError(f'{where}: empty or null {what} id; fix the file or pass '
                         '--drop-missing-ids to drop such rows')
    number, is_date = parse_stamp(stamp, where)
    self.users.append(ids[0])
    self.items.append(ids[1])
    self.stamps.append(number)
    self.dates.append(is_date)
    self.lines.append(line)

  def seconds(self) -> tuple[np.ndarray, str]:
    """(int64 unix seconds of every event, the unit used); out-of-range ones are errors."""
    dates_E = np.array(self.dates, bool)
    numbers_E = np.array(self.stamps, np.float64)
    unit = detect_unit(numbers_E[~dates_E]) if self.unit == 'auto' else self.unit
    factor = UNIT_FACTORS[unit]
    seconds_E = np.fromiter((v if d else int(v // factor) for v, d in
                             zip(self.stamps, self.dates)), np.int64, len(self.stamps))
    bad = np.flatnonzero((seconds_E < 0) | (seconds_E >= MAX_SECONDS))
    if bad.size:
      i = int(bad[0])
      check_seconds(int(seconds_E[i]), self.stamps[i], self.where(self.lines[i]))
    return seconds_E, unit

  def raw_data(self, table: ItemTable | None, source: str = '') -> RawData:
    source = source or str(self.path)
    if not self.items:
      raise PrepareError(f'{source}: no interactions found (empty input'
                         f'{", or every row dropped for a missing id" if self.missing else ""})')
    seconds_E, unit = self.seconds()
    return RawData(users=np.asarray(self.users, dtype=str),
                   items=np.asarray(self.items, dtype=str), timestamps=seconds_E,
                   item_table=table if table is not None else ids_only_table(self.items),
                   source=source, time_unit=unit, missing_id_events=self.missing,
                   missing_id_item_rows=table.missing if table is not None else 0)


def as_utc(moment: datetime.datetime) -> datetime.datetime:
  return moment.replace(tzinfo=datetime.timezone.utc) if moment.tzinfo is None else moment


def iso_seconds(text: str, where: str) -> int:
  try:
    return int(as_utc(datetime.datetime.fromisoformat(text.strip())).timestamp())
  except ValueError:
    raise PrepareError(f'{where}: timestamp {text!r} is neither a number nor an ISO date') \
        from None


def parse_number(text: str) -> float | None:
  """The float of a numeric string, or None."""
  try:
    return float(text)
  except ValueError:
    return None


def parse_price(value: Any) -> float:
  """A price from a number or a string like '$1,299.99' or '$1.99 - $5.99' (the first number);
  nan when missing or not a price."""
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return float(value)
  if not isinstance(value, str):
    return math.nan
  match = re.match(r'\s*\$?\s*([0-9][0-9,]*(?:\.[0-9]+)?)', value)
  return float(match.group(1).replace(',', '')) if match else math.nan


def token_value(value: Any) -> str | None:
  """A categorical value as text; None for missing or empty."""
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return None
  text = str(value).strip()
  return text or None


def token_values(values: Any) -> tuple[str, ...] | None:
  """A multi-valued entry from a list (nested lists flattened), values de-duplicated in order;
  None when empty or missing."""
  flat, stack = [], [values]
  while stack:
    value = stack.pop(0)
    if isinstance(value, (list, tuple, np.ndarray)):
      stack[:0] = list(value)
    elif (text := token_value(value)) is not None:
      flat.append(text)
  return tuple(dict.fromkeys(flat)) or None


def column_index(names: list[str], wanted: str, path: pathlib.Path) -> int:
  if wanted not in names:
    raise PrepareError(f'{path}: no column {wanted!r}; columns found: {names}')
  return names.index(wanted)


# ---------------------------------------------------------------------------------------------
# Assembling RawData.


def ids_only_table(items: list[str]) -> ItemTable:
  """The item table of a format read without an item file: the event items, first-seen order."""
  return ItemTable(keys=list(dict.fromkeys(items)), columns={})


def table_from_records(keys: list[str], records: dict[str, list], types: dict[str, str],
                        source: pathlib.Path, missing: int = 0) -> ItemTable:
  """An item table from column lists; columns without any value are left out. `missing`:
  rows dropped for a missing key."""
  if not keys:
    raise PrepareError(f'{source}: no items found (empty item file)')
  columns = {}
  for name, values in records.items():
    absent = (lambda v: v is None) if types[name] != FLOAT else math.isnan
    if not all(absent(v) for v in values):
      columns[name] = Column(types[name], values)
  return ItemTable(keys=keys, columns=columns, missing=missing)


def item_key(value: Any, where: str, drop_missing_ids: bool) -> str | None:
  """The key of an item-table row; None (the row is dropped) when missing and dropping."""
  key = clean_id(value, 'item', where)
  if key is None and not drop_missing_ids:
    raise PrepareError(f'{where}: empty or null item id; fix the file or pass '
                       '--drop-missing-ids to drop such rows')
  return key

"""Amazon review sequences in the ReRe/MiniOneRec CSV format.

A data directory holds three files, each plain or gzip-compressed (``name.gz``):

- ``info.txt``: one item per line, ``title<TAB>item_id``, ids 0..n-1.
- ``valid.csv`` and ``test.csv``: one next-item sample per row, columns ``user_id, item_asins,
  item_asin, history_item_id, item_id, history_item_title, item_title, history_rating, rating,
  history_timestamp, timestamp``; list columns are Python literals (``"[854, 2461]"``). We read
  ``user_id``, ``history_item_id`` (at most 10 ids, oldest first), ``item_id`` (the target),
  ``rating`` (1-5 stars) and ``timestamp`` (Unix seconds) and ignore the rest.

The samples are one per position of each user's time-ordered sequence, split by target time
(80/10/10; the training split is not shipped). Consecutive rows of a user therefore overlap: the
next row's history is this row's history plus this row's target (the last 10 of them). The
functions below rebuild each user's sequence from that overlap, in time order.

With no directory given, the vendored copy of Industrial_and_Scientific (5-core) in
``agorasim/data/amazon_industrial/`` is read. Any problem with the files raises
``UserInputError`` with one line naming the file, the row (1-based, header not counted) and what
is wrong, so the CLI can stop before any work.
"""

from __future__ import annotations

import ast
import csv
import gzip
import importlib.resources
import io
import json
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agorasim.data.embed import embed_titles, project
from agorasim.errors import UserInputError

HISTORY_LEN = 10  # items per history in the ReRe/MiniOneRec files; longer lists keep the last 10
PAD = -1  # history padding (left side; the most recent item is last)
DATA_FILES = ("info.txt", "valid.csv", "test.csv")
REQUIRED_COLUMNS = ("user_id", "history_item_id", "item_id", "rating", "timestamp")
_VENDORED = "amazon_industrial"


@dataclass(frozen=True)
class SplitRows:
    """One split's samples as arrays, one row per CSV row, in file order.

    Attributes:
        user: ``(N,)`` int64 user codes, indices into ``AmazonData.user_names`` (same codes in
            every split).
        history: ``(N, 10)`` int64 item ids, left-padded with -1, most recent item last.
        target: ``(N,)`` int64 item id that came next.
        target_rating: ``(N,)`` float32 stars (1-5) the user gave the target.
        timestamp: ``(N,)`` int64 Unix seconds of the target interaction.
    """

    user: np.ndarray
    history: np.ndarray
    target: np.ndarray
    target_rating: np.ndarray
    timestamp: np.ndarray

    def __len__(self) -> int:
        return len(self.target)


@dataclass(frozen=True)
class AmazonData:
    """A loaded data directory.

    Attributes:
        titles: Item titles; index = item id (0..n-1).
        valid: Validation samples.
        test: Test samples.
        user_names: Original ``user_id`` strings; index = user code.
        source: Directory the files were read from.
    """

    titles: list[str]
    valid: SplitRows
    test: SplitRows
    user_names: list[str]
    source: Path

    @property
    def n_items(self) -> int:
        return len(self.titles)

    @property
    def n_users(self) -> int:
        return len(self.user_names)


def _fail(where: str, problem: str) -> UserInputError:
    return UserInputError(f"amazon data: {where}: {problem}")


def _find_file(directory: Path, name: str) -> Path:
    """``directory/name`` or, failing that, ``directory/name.gz``."""
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise _fail(str(directory), f"missing {name} (or {name}.gz)")


def resolve_data_dir(path: str | Path | None) -> Path:
    """Directory to read the Amazon files from, checked to hold all three.

    Args:
        path: A directory with ``info.txt``, ``valid.csv`` and ``test.csv`` (each plain or
            ``.gz``); None for the copy vendored in the package.

    Returns:
        The directory.

    Raises:
        UserInputError: The directory or one of its files is missing.
    """
    if path is None:
        resource = importlib.resources.files("agorasim.data") / _VENDORED
        # A package installed from a wheel or in editable mode lives on the file system.
        directory = Path(str(resource))
    else:
        directory = Path(path).expanduser()
    if not directory.is_dir():
        raise _fail(str(directory), "no such directory")
    for name in DATA_FILES:
        _find_file(directory, name)
    return directory


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


# Reading errors a damaged file can give: truncated or corrupt gzip, non-UTF-8 bytes, a CSV field
# over csv's size limit or with a stray quote, an unreadable file.
_READ_ERRORS = (OSError, EOFError, zlib.error, UnicodeDecodeError, csv.Error)


def _read_titles(path: Path) -> list[str]:
    """Titles by item id from ``info.txt`` (``title<TAB>item_id`` per line)."""
    name = path.name
    by_id: dict[int, str] = {}
    try:
        with _open_text(path) as f:
            for line_no, line in enumerate(f, start=1):
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
                title, tab, item = line.rpartition("\t")
                if not tab:
                    raise _fail(f"{name} line {line_no}", "expected title<TAB>item_id")
                try:
                    item_id = int(item)
                except ValueError:
                    raise _fail(
                        f"{name} line {line_no}", f"item_id {item!r} is not an int"
                    ) from None
                if item_id in by_id:
                    raise _fail(f"{name} line {line_no}", f"item_id {item_id} appears twice")
                by_id[item_id] = title
    except _READ_ERRORS as err:
        raise _fail(name, f"cannot be read ({type(err).__name__}: {err})") from None
    if not by_id:
        raise _fail(name, "is empty")
    n = len(by_id)
    if min(by_id) != 0 or max(by_id) != n - 1:
        missing = min(set(range(n)) - set(by_id))
        raise _fail(name, f"item ids must be 0..{n - 1} with none missing; {missing} is missing")
    return [by_id[i] for i in range(n)]


def _parse_id_list(text: str) -> list[int] | None:
    """A list literal of ints, or None if ``text`` is not one."""
    try:
        # JSON covers the files' "[1, 2, 3]" and is several times faster than literal_eval.
        value = json.loads(text)
    except (ValueError, RecursionError):
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return None
    if not isinstance(value, (list, tuple)):
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return None
    return list(value)


def _read_split(path: Path, n_items: int, user_codes: dict[str, int]) -> SplitRows:
    """Read one split CSV; new users get the next free codes in ``user_codes``."""
    name = path.name
    users: list[int] = []
    histories: list[list[int]] = []
    targets: list[int] = []
    ratings: list[float] = []
    timestamps: list[int] = []
    try:
        with _open_text(path) as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise _fail(name, "is empty")
            header = [h.strip().lstrip("\ufeff") for h in header]
            for column in REQUIRED_COLUMNS:
                if column not in header:
                    raise _fail(
                        name, f"no column {column!r} (needs {', '.join(REQUIRED_COLUMNS)})"
                    )
            i_user, i_hist, i_item, i_rating, i_time = (header.index(c) for c in REQUIRED_COLUMNS)
            width = len(header)
            for row_no, row in enumerate(reader, start=1):
                if not row:
                    continue
                where = f"{name} row {row_no}"
                if len(row) != width:
                    raise _fail(where, f"{len(row)} fields, the header has {width}")
                user = row[i_user].strip()
                if not user:
                    raise _fail(where, "user_id is empty")
                history = _parse_id_list(row[i_hist])
                if history is None:
                    raise _fail(where, "history_item_id is not a list of ints")
                try:
                    target = int(row[i_item])
                except ValueError:
                    raise _fail(where, f"item_id {row[i_item]!r} is not an int") from None
                for item in (*history, target):
                    if not 0 <= item < n_items:
                        raise _fail(
                            where,
                            f"item id {item} is out of range 0..{n_items - 1} of info.txt",
                        )
                try:
                    rating = float(row[i_rating])
                except ValueError:
                    rating = math.nan
                if not math.isfinite(rating):
                    raise _fail(where, f"rating {row[i_rating]!r} is not a number")
                try:
                    timestamp = int(row[i_time])
                except ValueError:
                    raise _fail(
                        where, f"timestamp {row[i_time]!r} is not an int (Unix seconds)"
                    ) from None
                users.append(user_codes.setdefault(user, len(user_codes)))
                histories.append(history[-HISTORY_LEN:])
                targets.append(target)
                ratings.append(rating)
                timestamps.append(timestamp)
    except _READ_ERRORS as err:
        raise _fail(name, f"cannot be read ({type(err).__name__}: {err})") from None
    if not targets:
        raise _fail(name, "has no rows")
    history = np.full((len(histories), HISTORY_LEN), PAD, dtype=np.int64)
    for row, items in enumerate(histories):
        if items:
            history[row, HISTORY_LEN - len(items) :] = items
    return SplitRows(
        user=np.asarray(users, dtype=np.int64),
        history=history,
        target=np.asarray(targets, dtype=np.int64),
        target_rating=np.asarray(ratings, dtype=np.float32),
        timestamp=np.asarray(timestamps, dtype=np.int64),
    )


def load_amazon(path: str | Path | None = None) -> AmazonData:
    """Load a ReRe/MiniOneRec data directory.

    Args:
        path: Directory with ``info.txt``, ``valid.csv``, ``test.csv`` (plain or ``.gz``); None
            for the vendored Industrial_and_Scientific copy.

    Returns:
        The titles and both splits; user codes are assigned in order of first appearance,
        valid rows first.

    Raises:
        UserInputError: A file is missing, empty or malformed (one line naming file and row).
    """
    directory = resolve_data_dir(path)
    titles = _read_titles(_find_file(directory, "info.txt"))
    user_codes: dict[str, int] = {}
    valid = _read_split(_find_file(directory, "valid.csv"), len(titles), user_codes)
    test = _read_split(_find_file(directory, "test.csv"), len(titles), user_codes)
    return AmazonData(
        titles=titles, valid=valid, test=test, user_names=list(user_codes), source=directory
    )


def _unpadded(history_row: np.ndarray) -> list[int]:
    return history_row[history_row != PAD].tolist()


def _user_sequences(
    data: AmazonData, splits: Sequence[str]
) -> tuple[np.ndarray, list[list[int]], list[int]]:
    """Each user's item sequence, rebuilt from the rows of ``splits`` in time order.

    A user's rows are ordered by target timestamp, ties by split order then file order (the files
    are written in time order, so this is the order of the original sequence). The sequence
    starts with the first row's history; each row then adds its target, after any of its history
    items not already at the end of the sequence (there are none when no row is missing).

    Returns:
        ``(users, sequences, first_target)``: user codes ascending, each user's item ids oldest
        first, and the position in the sequence of the user's first target (what comes before it
        is the history that precedes these splits).
    """
    rows = [getattr(data, split) for split in splits]
    user = np.concatenate([r.user for r in rows])
    history = np.concatenate([r.history for r in rows])
    target = np.concatenate([r.target for r in rows])
    timestamp = np.concatenate([r.timestamp for r in rows])
    order = np.lexsort((np.arange(len(user)), timestamp, user))
    starts = np.flatnonzero(np.r_[True, np.diff(user[order]) != 0])
    users = user[order[starts]]
    sequences: list[list[int]] = []
    first_target: list[int] = []
    for group in np.split(order, starts[1:]):
        sequence: list[int] = []
        first = -1
        for row in group:
            items = _unpadded(history[row])
            if sequence[len(sequence) - len(items) :] != items:
                overlap = min(len(sequence), len(items))
                while overlap and sequence[-overlap:] != items[:overlap]:
                    overlap -= 1
                sequence.extend(items[overlap:])
            if first < 0:
                first = len(sequence)
            sequence.append(int(target[row]))
        sequences.append(sequence)
        first_target.append(first)
    return users, sequences, first_target


def training_sequences(data: AmazonData) -> list[np.ndarray]:
    """Each validation user's longest known sequence: valid histories + valid targets.

    Args:
        data: Loaded data.

    Returns:
        One int64 array of item ids per user in ``valid.csv`` (ascending user code), oldest
        first: the history of the user's earliest valid row followed by the targets of all the
        user's valid rows. It contains validation targets, so evaluate a model trained on it on
        the test split only (``train_pairs`` gives leak-free pairs).
    """
    _, sequences, _ = _user_sequences(data, ("valid",))
    return [np.asarray(s, dtype=np.int64) for s in sequences]


def train_pairs(
    data: AmazonData, max_len: int = HISTORY_LEN, include_valid_targets: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Next-item training pairs that leak no validation or test target.

    By default only the items that precede the validation period are used: for each user in
    ``valid.csv``, the history of that user's earliest validation row (at most 10 items, from
    the training period, which is not shipped). Item j of that history (j >= 1) is predicted
    from items 0..j-1 (the last ``max_len`` of them). Later valid histories add nothing new:
    they only append the validation targets. Test rows are not used at all.

    Args:
        data: Loaded data.
        max_len: History width of the returned pairs.
        include_valid_targets: Use the full ``training_sequences`` instead (validation targets
            included): more pairs, for a model evaluated on the test split only.

    Returns:
        ``(history, target)``: ``(N, max_len)`` int64 item ids left-padded with -1, most
        recent last, and ``(N,)`` int64 next items; users in ascending code, positions in time
        order.
    """
    assert max_len >= 1, max_len
    _, sequences, first_target = _user_sequences(data, ("valid",))
    histories, targets = [], []
    for sequence, first in zip(sequences, first_target):
        items = np.asarray(sequence if include_valid_targets else sequence[:first], dtype=np.int64)
        if len(items) < 2:
            continue
        # Window j of the padded sequence holds the max_len items before items[j].
        padded = np.concatenate([np.full(max_len, PAD, dtype=np.int64), items])
        windows = np.lib.stride_tricks.sliding_window_view(padded, max_len)
        histories.append(windows[1 : len(items)])
        targets.append(items[1:])
    if not targets:
        return np.empty((0, max_len), dtype=np.int64), np.empty(0, dtype=np.int64)
    return np.concatenate(histories), np.concatenate(targets)


def bootstrap_users(data: AmazonData) -> tuple[np.ndarray, np.ndarray]:
    """Each distinct user's latest known history, to start simulated users from real ones.

    The user's sequence is rebuilt from valid and test rows together (histories + targets, time
    order) and its last 10 items are kept, so the latest row's own target is included: it is the
    most recent thing the user is known to have bought.

    Args:
        data: Loaded data.

    Returns:
        ``(user_ids, histories)``: ``(U,)`` int64 user codes ascending (every user of either
        split) and ``(U, 10)`` int64 item ids left-padded with -1, most recent last.
    """
    users, sequences, _ = _user_sequences(data, ("valid", "test"))
    histories = np.full((len(users), HISTORY_LEN), PAD, dtype=np.int64)
    for row, sequence in enumerate(sequences):
        tail = sequence[-HISTORY_LEN:]
        histories[row, HISTORY_LEN - len(tail) :] = tail
    return users.astype(np.int64), histories


def item_embeddings(
    data: AmazonData, dim: int = 32, cache_dir: Path | None = None
) -> np.ndarray:
    """Item vectors for the world: title embeddings (all-MiniLM-L6-v2) projected to ``dim``.

    Args:
        data: Loaded data.
        dim: Item embedding dimension (DESIGN.md section 4 uses 32..64).
        cache_dir: Embedding cache directory; None for ``embed.default_cache_dir()``.

    Returns:
        ``(n_items, dim)`` float32 unit-norm rows, row i for item id i.
    """
    return project(embed_titles(data.titles, cache_dir), dim, seed=0)

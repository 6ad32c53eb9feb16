"""Ratings for the collaborative-filtering demo: a synthetic MovieLens-100k look-alike generated
from a seed, or MovieLens files the user already has.

Every source ends as a ``Ratings``: parallel tensors of contiguous user and item indices and the
ratings, with the original ids and the item titles kept for the interpretation step.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# The shape of MovieLens 100k (ml-100k): 943 users, 1682 movies, 100,000 ratings of 1..5 stars,
# every user with at least 20 ratings.
ML100K_USERS, ML100K_ITEMS, ML100K_RATINGS, ML100K_MIN_PER_USER = 943, 1682, 100_000, 20


class RatingsFileError(ValueError):
    """A ratings or titles file is missing or malformed; the message names the file (and line)."""


@dataclass
class PlantedTruth:
    """What the synthetic generator put in, to check what the model learns against."""

    global_mean: float
    user_bias: np.ndarray  # (n_users,)
    item_bias: np.ndarray  # (n_items,)
    user_factors: np.ndarray  # (n_users, n_factors)
    item_factors: np.ndarray  # (n_items, n_factors)
    noise_std: float


@dataclass
class Ratings:
    """Ratings with users and items renumbered 0..n-1 (``user_ids[i]`` is user i's original id)."""

    users: torch.Tensor  # (n,) int64 contiguous user index
    items: torch.Tensor  # (n,) int64 contiguous item index
    ratings: torch.Tensor  # (n,) float32
    user_ids: np.ndarray
    item_ids: np.ndarray
    titles: list[str]  # one per contiguous item index
    source: str
    planted: PlantedTruth | None = None

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def __len__(self) -> int:
        return len(self.ratings)

    def y_range(self) -> tuple[float, float]:
        """The output range for EmbeddingDotBias: from 0 (or the lowest rating, if negative) to
        10% above the highest rating, so the sigmoid need not saturate to reach the top score;
        (0, 5.5) for MovieLens, as in the lesson."""
        low = min(0.0, float(self.ratings.min()))
        high = float(self.ratings.max())
        return low, high + 0.1 * (high - low)

    def item_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean rating, number of ratings) per item; the mean is NaN for an item nobody rated."""
        counts = torch.bincount(self.items, minlength=self.n_items).numpy()
        sums = torch.bincount(self.items, weights=self.ratings.double(), minlength=self.n_items).numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            return sums / counts, counts


def synthetic_movielens(
    seed: int = 0,
    n_users: int = ML100K_USERS,
    n_items: int = ML100K_ITEMS,
    n_ratings: int = ML100K_RATINGS,
    n_factors: int = 5,
    noise_std: float = 0.7,
) -> Ratings:
    """Ratings shaped like MovieLens 100k, generated from ``seed`` (no download).

    Each rating is round(mean + user bias + item bias + <user factors, item factors> + noise),
    clipped to 1..5. Item popularity is Zipf-skewed (Zipf-Mandelbrot weights 1/(rank + 40)^1.2,
    ranks shuffled), so a few items have hundreds of ratings and many have a handful; user
    activity is log-normal on top of a floor of 20 ratings per user, as in ml-100k. No
    (user, item) pair repeats. The planted values come back in ``Ratings.planted``.
    """
    if n_ratings > n_users * n_items:
        raise ValueError(f"n_ratings={n_ratings} exceeds the {n_users * n_items} possible (user, item) pairs")
    rng = np.random.default_rng(seed)
    popularity = (rng.permutation(n_items) + 41.0) ** -1.2
    popularity /= popularity.sum()
    activity = rng.lognormal(0.0, 1.0, n_users)
    activity /= activity.sum()

    floor = min(ML100K_MIN_PER_USER, n_ratings // n_users, n_items)
    pair_keys = np.empty(0, dtype=np.int64)
    guaranteed_users = np.repeat(np.arange(n_users), floor)
    draws = [guaranteed_users]
    while True:
        users = np.concatenate(draws)
        items = rng.choice(n_items, size=len(users), p=popularity)
        pair_keys = np.concatenate([pair_keys, users * n_items + items])
        _, first = np.unique(pair_keys, return_index=True)
        pair_keys = pair_keys[np.sort(first)]  # drop repeated pairs, keep the earliest draws
        if len(pair_keys) >= n_ratings:
            break
        shortfall = n_ratings - len(pair_keys)
        draws = [rng.choice(n_users, size=shortfall + shortfall // 4 + 16, p=activity)]
    pair_keys = rng.permutation(pair_keys[:n_ratings])
    users, items = pair_keys // n_items, pair_keys % n_items

    # Spreads chosen so the ratings look like ml-100k's (mean ~3.5, std ~1.1) and a model can
    # explain roughly half of the variance: the noise and the rounding are the rest.
    truth = PlantedTruth(
        global_mean=3.5,
        user_bias=rng.normal(0.0, 0.35, n_users),
        item_bias=rng.normal(0.0, 0.5, n_items),
        user_factors=rng.normal(0.0, 0.47, (n_users, n_factors)),
        item_factors=rng.normal(0.0, 0.47, (n_items, n_factors)),
        noise_std=noise_std,
    )
    score = (
        truth.global_mean
        + truth.user_bias[users]
        + truth.item_bias[items]
        + (truth.user_factors[users] * truth.item_factors[items]).sum(1)
        + rng.normal(0.0, noise_std, n_ratings)
    )
    stars = np.clip(np.rint(score), 1, 5)
    return Ratings(
        users=torch.from_numpy(users),
        items=torch.from_numpy(items),
        ratings=torch.from_numpy(stars.astype(np.float32)),
        user_ids=np.arange(1, n_users + 1),
        item_ids=np.arange(1, n_items + 1),
        titles=[f"Synthetic movie {i:04d}" for i in range(1, n_items + 1)],
        source=f"synthetic MovieLens-100k look-alike (seed {seed})",
        planted=truth,
    )


def load_ratings(path: str | Path) -> Ratings:
    """Load MovieLens ratings from ``path``:

    * an ml-100k folder, or its ``u.data`` (tab-separated user, item, rating, timestamp; titles
      from ``u.item`` beside it, latin-1, ``id|title|...``);
    * an ml-latest(-small) folder, or its ``ratings.csv`` (header userId,movieId,rating,...;
      titles from ``movies.csv`` beside it, movieId,title,genres).

    User and item ids are renumbered to contiguous indices in increasing id order. A missing or
    malformed ratings file raises RatingsFileError naming the file and line; a missing titles
    file is allowed (items are then shown by id), a malformed one is an error.
    """
    path = Path(path)
    if not path.exists():
        raise RatingsFileError(f"{path}: no such file or directory")
    if path.is_dir():
        if (path / "u.data").is_file():
            path = path / "u.data"
        elif (path / "ratings.csv").is_file():
            path = path / "ratings.csv"
        else:
            raise RatingsFileError(
                f"{path}: found neither u.data (ml-100k) nor ratings.csv (ml-latest) in this folder"
            )
    if path.suffix.lower() == ".csv":
        user_ids, item_ids, ratings = _read_ratings_csv(path)
        titles_file, read_titles = path.parent / "movies.csv", _read_movies_csv
    else:
        user_ids, item_ids, ratings = _read_u_data(path)
        titles_file, read_titles = path.parent / "u.item", _read_u_item
    titles_by_id = read_titles(titles_file) if titles_file.is_file() else {}

    unique_users, users = np.unique(np.asarray(user_ids, dtype=np.int64), return_inverse=True)
    unique_items, items = np.unique(np.asarray(item_ids, dtype=np.int64), return_inverse=True)
    source = str(path) if titles_by_id else f"{path} (no {titles_file.name} beside it: items shown by id)"
    return Ratings(
        users=torch.from_numpy(users.astype(np.int64)),
        items=torch.from_numpy(items.astype(np.int64)),
        ratings=torch.tensor(ratings, dtype=torch.float32),
        user_ids=unique_users,
        item_ids=unique_items,
        titles=[titles_by_id.get(int(i), f"item {i}") for i in unique_items],
        source=source,
    )


def _parse_id(text: str, what: str, where: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise RatingsFileError(f"{where}: {what} {text!r} is not an integer id") from None


def _parse_rating(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise RatingsFileError(f"{where}: rating {text!r} is not a number") from None
    if not math.isfinite(value):
        raise RatingsFileError(f"{where}: rating {text!r} is not a finite number")
    return value


def _no_ratings(path: Path) -> RatingsFileError:
    return RatingsFileError(f"{path}: the file holds no ratings")


def _delimited_lines(path: Path, separator: str, min_fields: int, expected: str):
    """(where, fields) for each non-blank line of a latin-1 ml-100k file; a line with fewer than
    ``min_fields`` fields raises, naming the file and line."""
    with open(path, encoding="latin-1", newline="") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            fields = line.rstrip("\r\n").split(separator)
            where = f"{path}, line {line_number}"
            if len(fields) < min_fields:
                raise RatingsFileError(f"{where}: expected {expected}, got {line.strip()!r}")
            yield where, fields


def _csv_rows(path: Path, reader, width: int):
    """(where, row) for each non-blank row that ``reader`` (a csv.reader past the header) yields;
    a row of another width than ``width`` raises, naming the file and line."""
    for row in reader:
        if not any(field.strip() for field in row):
            continue
        where = f"{path}, line {reader.line_num}"
        if len(row) != width:
            raise RatingsFileError(f"{where}: expected {width} comma-separated fields, got {len(row)}: {row}")
        yield where, row


def _read_u_data(path: Path) -> tuple[list[int], list[int], list[float]]:
    users, items, ratings = [], [], []
    for where, fields in _delimited_lines(path, "\t", 3, "tab-separated user, item, rating[, timestamp]"):
        users.append(_parse_id(fields[0], "user id", where))
        items.append(_parse_id(fields[1], "item id", where))
        ratings.append(_parse_rating(fields[2], where))
    if not ratings:
        raise _no_ratings(path)
    return users, items, ratings


def _read_ratings_csv(path: Path) -> tuple[list[int], list[int], list[float]]:
    users, items, ratings = [], [], []
    with open(path, encoding="utf-8", newline="") as stream:
        reader = csv.reader(stream)
        header = next(reader, None)
        if header is None:
            raise _no_ratings(path)
        columns = [name.strip() for name in header]
        required = ("userId", "movieId", "rating")
        if any(name not in columns for name in required):
            raise RatingsFileError(
                f"{path}, line 1: expected a header naming the columns {', '.join(required)}, got {','.join(header)!r}"
            )
        user_col, item_col, rating_col = (columns.index(name) for name in required)
        for where, row in _csv_rows(path, reader, len(columns)):
            users.append(_parse_id(row[user_col], "userId", where))
            items.append(_parse_id(row[item_col], "movieId", where))
            ratings.append(_parse_rating(row[rating_col], where))
    if not ratings:
        raise _no_ratings(path)
    return users, items, ratings


def _read_u_item(path: Path) -> dict[int, str]:
    return {
        _parse_id(fields[0], "movie id", where): fields[1]
        for where, fields in _delimited_lines(path, "|", 2, "'|'-separated movie id|title|...")
    }


def _read_movies_csv(path: Path) -> dict[int, str]:
    titles = {}
    with open(path, encoding="utf-8", newline="") as stream:
        reader = csv.reader(stream)
        header = [name.strip() for name in next(reader, [])]
        if "movieId" not in header or "title" not in header:
            raise RatingsFileError(f"{path}, line 1: expected a header naming the columns movieId, title, got {header}")
        id_col, title_col = header.index("movieId"), header.index("title")
        for where, row in _csv_rows(path, reader, len(header)):
            titles[_parse_id(row[id_col], "movieId", where)] = row[title_col]
    return titles

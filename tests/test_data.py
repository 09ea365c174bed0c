from pathlib import Path

import numpy as np
import pytest

from poeem import PoeemError
from poeem.data import DataConfig, load_data, load_lightgcn, load_movielens, load_table, synthetic_task
from poeem.data.synthetic import synthetic_relevance


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_synthetic_pairs_are_relevant_and_rule_is_exact() -> None:
    data = synthetic_task(num_pairs=5000, seed=1)
    assert data.num_queries == data.num_items == 10_000
    assert synthetic_relevance(data.train_queries, data.train_items[:, None]).all()
    # query ..12 matches items with a 1 and a 2 at different positions, in either order
    q = np.array([4512])
    items = np.array([[1200, 2100, 9912, 1111, 3456, 1002]])
    assert synthetic_relevance(q, items).tolist() == [[True, True, True, False, False, True]]
    assert synthetic_relevance(np.array([11]), np.array([[1000, 1100]])).tolist() == [[False, True]]
    counts = data.relevant_counts
    assert counts[4512] == sum(synthetic_relevance(q, np.arange(10_000)[None])[0])


def test_synthetic_is_seeded() -> None:
    a, b = synthetic_task(1000, seed=3), synthetic_task(1000, seed=3)
    assert np.array_equal(a.train_queries, b.train_queries)


def test_movielens_u_data_leave_last_out(tmp_path: Path) -> None:
    f = write(
        tmp_path / "u.data",
        "1\t10\t5\t100\n1\t11\t3\t200\n1\t12\t4\t300\n2\t10\t4\t50\n2\t12\t2\t40\n3\t11\t5\t1\n",
    )
    data = load_movielens(tmp_path)
    assert (data.num_queries, data.num_items) == (3, 3)
    # user 1's latest (item 12 -> dense 2) and user 2's latest (item 10 -> 0) are held out
    assert data.test.row(0).tolist() == [2] and data.test.row(1).tolist() == [0]
    assert data.test.row(2).tolist() == []  # one rating only: stays in training
    assert data.num_train == 4
    assert load_movielens(f, min_rating=4).num_train == 3  # 4 kept, user 1 holds one out


def test_movielens_dat_and_csv(tmp_path: Path) -> None:
    load = load_movielens(write(tmp_path / "a" / "ratings.dat", "1::5::4::10\n1::6::4::11\n"))
    assert load.num_train == 1
    csv = write(tmp_path / "b" / "ratings.csv", "userId,movieId,rating,timestamp\n1,5,4.5,10\n1,6,3.0,11\n")
    assert load_movielens(csv).test.row(0).tolist() == [1]


@pytest.mark.parametrize(
    ("name", "text", "line"),
    [
        ("u.data", "1\t10\t5\t100\n1\t11\tfive\t200\n", 2),
        ("u.data", "1\t10\t5\t100\n2\t10\t4\t50\n1\t11\n", 3),
        ("ratings.dat", "1::5::4::10\n1::x::4::11\n", 2),
        ("ratings.csv", "userId,movieId,rating,timestamp\n1,5,4,10\n1,6,4,11\n1,7,,12\n", 4),
    ],
)
def test_movielens_malformed_line_is_named(tmp_path: Path, name: str, text: str, line: int) -> None:
    f = write(tmp_path / name, text)
    with pytest.raises(PoeemError, match=rf"{name}, line {line}: expected "):
        load_movielens(f)


def test_lightgcn_format(tmp_path: Path) -> None:
    write(tmp_path / "train.txt", "0 1 2 3\n1 0\n2 4 5\n")
    write(tmp_path / "test.txt", "0 4\n1 2 3\n2\n")
    data = load_lightgcn(tmp_path)
    assert (data.num_queries, data.num_items, data.num_train) == (3, 6, 6)
    assert data.test.row(1).tolist() == [2, 3] and data.train_csr().row(0).tolist() == [1, 2, 3]


def test_lightgcn_malformed(tmp_path: Path) -> None:
    write(tmp_path / "train.txt", "0 1 2\n1 0 x\n")
    write(tmp_path / "test.txt", "0 4\n")
    with pytest.raises(PoeemError, match=r"train.txt, line 2: expected 'user item item \.\.\.'.*'1 0 x'"):
        load_lightgcn(tmp_path)


def test_table_csv_with_features(tmp_path: Path) -> None:
    f = write(tmp_path / "t.csv", "u,i,ts,price\na,x,1,2.5\na,y,2,3.0\nb,x,3,2.5\nb,z,4,1.0\n")
    data = load_table(f, "u", "i", "ts", item_feature_columns=("price",), split="leave-last-out")
    assert (data.num_queries, data.num_items) == (2, 3)
    assert data.item_features.shape == (3, 1) and data.item_features[2, 0] == 1.0
    assert data.test.row(0).tolist() == [1]  # a's latest item y


def test_table_parquet(tmp_path: Path) -> None:
    import pandas as pd

    path = tmp_path / "t.parquet"
    pd.DataFrame({"user": [1, 1, 2, 2], "item": [3, 4, 3, 5]}).to_parquet(path)
    assert load_table(path, seed=0).num_queries == 2


def test_table_errors(tmp_path: Path) -> None:
    f = write(tmp_path / "t.csv", "u,i,ts\na,x,1\na,y,oops\n")
    with pytest.raises(PoeemError, match=r"t.csv, line 3: expected a number in column 'ts'"):
        load_table(f, "u", "i", "ts")
    with pytest.raises(PoeemError, match=r"expected a header with columns \['user', 'item'\]"):
        load_table(f)


def test_missing_path_is_clear(tmp_path: Path) -> None:
    with pytest.raises(PoeemError, match="expected an existing file"):
        load_data(DataConfig(kind="lightgcn", path=str(tmp_path)))
    with pytest.raises(PoeemError, match="expected a path"):
        load_data(DataConfig(kind="movielens"))


def test_duplicate_rows_never_put_a_held_out_item_in_training(tmp_path: Path) -> None:
    """Regression: the table loader kept duplicate (user, item) rows, so the held-out latest
    interaction could also sit in training."""
    rows = "user,item,time\na,x,1\na,y,2\na,x,3\nb,x,1\nb,y,2\n"
    data = load_table(write(tmp_path / "t.csv", rows), time_column="time", split="leave-last-out")
    users, items = data.query_keys, data.item_keys
    a, x = users.rows(["a"])[0], items.rows(["x"])[0]
    assert data.test.row(a).tolist() == [x]  # a's latest is x (time 3)
    train_a = data.train_items[data.train_queries == a].tolist()
    assert x not in train_a and train_a == [items.rows(["y"])[0]]


def test_table_ids_keep_their_type(tmp_path: Path) -> None:
    numeric = load_table(write(tmp_path / "n.csv", "user,item\n0042,7\n17,8\n17,7\n"))
    assert numeric.query_keys.is_integer and numeric.query_keys.keys.tolist() == [17, 42]
    text = load_table(write(tmp_path / "s.csv", "user,item\nann,7\nbob,8\nbob,7\n"))
    assert text.query_keys.keys.tolist() == ["ann", "bob"] and text.item_keys.is_integer

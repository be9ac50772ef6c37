"""The training data order and stages: seeded, resumable, world-size-independent; bad rows counted."""

import numpy as np
import pytest

from jobs.train_data import DataConfig, DecodeCrop, ReadRows, build_index, epoch_order, steps_per_epoch, worker_rows
from tests.jobs.train_fixtures import make_dataset, square_png


@pytest.fixture(scope="module")
def squares(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "squares"
    return str(make_dataset(str(root), n=40, size=16, shards=3, failed=(3, 17), corrupt=(5,), empty_shard=True))


def test_index_skips_failed_fetches_and_tolerates_an_empty_shard(squares):
    index = build_index(DataConfig(datasets=[squares]))
    assert len(index.shards) == 4 and index.num_rows == 38      # 40 rows, 2 failed fetches, 1 empty shard
    assert index.fingerprint == build_index(DataConfig(datasets=[squares])).fingerprint


def test_order_is_seeded_and_a_permutation_per_epoch(squares):
    index = build_index(DataConfig(datasets=[squares]))
    a, b = epoch_order(index, 0, 0), epoch_order(index, 0, 0)
    assert np.array_equal(a, b) and sorted(a) == list(range(index.num_rows))
    assert not np.array_equal(a, epoch_order(index, 0, 1)) and not np.array_equal(a, epoch_order(index, 1, 0))
    windowed = epoch_order(index, 0, 0, window=1)              # one shard at a time: rows stay together
    shard_runs = np.flatnonzero(np.diff(index.rows[windowed, 0]) != 0)
    assert sorted(windowed) == list(range(index.num_rows)) and len(shard_runs) == 2


def test_worker_slices_resume_anywhere_with_any_world_size(squares):
    cfg = DataConfig(datasets=[squares], batch_size=8)
    index = build_index(cfg)
    spe = steps_per_epoch(index, 8)
    # The whole stream of 11 steps (crossing two epoch boundaries) as one worker sees it ...
    one = worker_rows(index, cfg, 0, 11, 0, 1).reshape(11, 8)
    # ... equals two workers' slices glued per step, and a run resumed at step 5 with 4 workers.
    two = np.concatenate([worker_rows(index, cfg, 0, 11, r, 2).reshape(11, 4) for r in range(2)], axis=1)
    four = np.concatenate([worker_rows(index, cfg, 5, 11, r, 4).reshape(6, 2) for r in range(4)], axis=1)
    assert np.array_equal(one, two) and np.array_equal(one[5:], four)
    for e in range(2):                                          # no row twice within an epoch
        epoch = one[e * spe:(e + 1) * spe].reshape(-1)
        assert len(set(epoch.tolist())) == len(epoch)
    with pytest.raises(ValueError, match="divisible"):
        worker_rows(index, cfg, 0, 1, 0, 3)


def test_mix_weights_set_each_datasets_share(tmp_path, squares):
    small = make_dataset(str(tmp_path / "small"), n=8, size=16, shards=1, prefix="s")
    index = build_index(DataConfig(datasets=[squares, small], weights=[1.0, 1.0]))
    order = epoch_order(index, 0, 0)
    from_small = np.isin(order, index.dataset_rows[1]).sum()
    assert len(order) == 46 and from_small == 23                # half the epoch: the 8 small rows cycle ~3x


def test_missing_dataset_or_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_index(DataConfig(datasets=[str(tmp_path / "nope")]))
    (tmp_path / "half").mkdir()
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        build_index(DataConfig(datasets=[str(tmp_path / "half")]))
    with pytest.raises(ValueError, match="data.weights"):
        build_index(DataConfig(datasets=[str(tmp_path / "half")], weights=[1, 2]))


def test_a_dataset_of_only_empty_shards_is_a_clear_error(tmp_path):
    root = make_dataset(str(tmp_path / "empty"), n=0, size=16, shards=1)
    with pytest.raises(ValueError, match="no usable rows"):
        build_index(DataConfig(datasets=[root]))


def test_stages_decode_crop_and_count_a_corrupt_image(squares):
    cfg = DataConfig(datasets=[squares])
    index = build_index(cfg)
    gids = np.arange(8)                                        # rows 0..8 minus the failed row 3: includes corrupt row 5
    out = DecodeCrop(16)(ReadRows(index, cfg)({"data": gids}))
    assert out["image"].shape == (8, 3, 16, 16) and out["image"].dtype == np.float32
    assert out["image"].min() >= -1 and out["image"].max() <= 1
    bad = [k for k, v in zip(out["key"], out["valid"]) if not v]
    assert bad == ["000005"]
    data, caption = square_png(0, 16)
    ok = DecodeCrop(8)({"key": np.array(["k"]), "image": np.array([data], dtype=object), "caption": np.array([caption])})
    assert ok["valid"].all() and ok["image"].shape == (1, 3, 8, 8)

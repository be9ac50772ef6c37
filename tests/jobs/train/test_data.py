"""The training data order and stages: seeded, resumable, world-size-independent; bad rows counted."""

import numpy as np
import pytest
import torch

from jobs.train.data import (DataConfig, DecodeCrop, ReadDecode, ReadRows, build_index, epoch_order, steps_per_epoch, to_model_range,
                             worker_rows, with_partitions)
from tests.jobs.train.fixtures import make_dataset, square_png


def test_index_skips_failed_fetches_and_tolerates_an_empty_shard(squares):
    index = build_index(DataConfig(datasets=[squares]))
    assert len(index.shards) == 4 and index.num_rows == 38      # 40 rows, 2 failed fetches, 1 empty shard
    assert index.fingerprint == build_index(DataConfig(datasets=[squares])).fingerprint


def test_index_is_compact_and_refuses_numbers_past_int32(squares, monkeypatch):
    import jobs.train.data as td

    index = build_index(DataConfig(datasets=[squares]))
    assert index.rows.dtype == np.int32 and index.dataset_starts.tolist() == [0, 38]
    assert np.array_equal(index.dataset_rows[0], np.arange(38))
    monkeypatch.setattr(td, "INT32_MAX", 5)                  # as if a shard held more than 2**31 - 1 rows
    with pytest.raises(ValueError, match=r"training shard .*shard-\d+\.parquet: shard, row group or row number past 5"):
        build_index(DataConfig(datasets=[squares]))


def test_order_of_existing_runs_never_changes(squares):
    """Checkpoints record only the step: any change to the order function would silently make
    resumed runs repeat and skip samples, so the order of a fixed dataset is pinned here."""
    index = build_index(DataConfig(datasets=[squares]))
    cfg = DataConfig(datasets=[squares], batch_size=8, partitions=2, shuffle_rows=4, seed=7)
    assert epoch_order(index, cfg, 0).tolist() == [35, 34, 36, 37, 6, 27, 5, 26, 13, 16, 15, 14, 28, 30, 31, 29,
                                                    19, 18, 0, 17, 7, 8, 32, 33, 2, 1, 4, 3, 11, 9, 12, 10]
    assert epoch_order(index, cfg, 3).tolist() == [27, 26, 29, 28, 23, 21, 22, 24, 32, 31, 30, 33, 13, 15, 25, 14,
                                                    2, 1, 3, 0, 17, 16, 19, 18, 6, 20, 4, 5, 37, 35, 34, 36]


def test_order_is_seeded_and_never_repeats_a_row_within_an_epoch(squares):
    index = build_index(DataConfig(datasets=[squares]))
    cfg = DataConfig(datasets=[squares], batch_size=8, partitions=2, shuffle_rows=8)
    a, b = epoch_order(index, cfg, 0), epoch_order(index, cfg, 0)
    assert np.array_equal(a, b) and len(a) == 32 and len(set(a.tolist())) == 32     # 38 rows -> 4 steps of 8
    assert set(a.tolist()) <= set(range(index.num_rows))
    assert not np.array_equal(a, epoch_order(index, cfg, 1))
    assert not np.array_equal(a, epoch_order(index, DataConfig(**{**cfg.__dict__, "seed": 1}), 0))
    with pytest.raises(ValueError, match="partitions"):
        epoch_order(index, DataConfig(datasets=[squares], batch_size=8, partitions=3), 0)


def test_row_groups_stay_in_one_stream_and_one_block(squares):
    """Streams own whole row groups, so each is read by one worker; blocks keep its rows close."""
    index = build_index(DataConfig(datasets=[squares]))
    cfg = DataConfig(datasets=[squares], batch_size=8, partitions=2, shuffle_rows=4)
    order = epoch_order(index, cfg, 0).reshape(4, 2, 4)                     # [step, stream, row]
    units = index.rows[order, 2]
    owners = {int(u): {int(j) for j in np.flatnonzero((units == u).any(axis=(0, 2)))} for u in np.unique(units)}
    # A stream's share of a dataset is cut from one sequence of whole row groups, so at most the
    # one row group at the cut is split between the two streams.
    assert sum(len(o) > 1 for o in owners.values()) <= 1, owners
    unshuffled = epoch_order(index, DataConfig(**{**cfg.__dict__, "shuffle_rows": 1}), 0).reshape(4, 2, 4)
    runs = index.rows[unshuffled.transpose(1, 0, 2).reshape(2, -1), 2]     # each stream's rows in order
    assert all(len(np.unique(r)) == 1 + np.count_nonzero(np.diff(r)) for r in runs), "whole row groups in a row"


def test_worker_slices_resume_anywhere_with_any_world_size(squares):
    cfg = DataConfig(datasets=[squares], batch_size=8, partitions=2)
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
    cfg = DataConfig(datasets=[squares, small], weights=[1.0, 1.0], batch_size=8, partitions=2)
    index = build_index(cfg)
    order = epoch_order(index, cfg, 0)
    from_small = np.isin(order, index.dataset_rows[1]).sum()
    assert len(order) == 40 and from_small == 20                # half the epoch: the 8 small rows cycle 2.5x
    per_stream = np.isin(order.reshape(5, 2, 4), index.dataset_rows[1]).sum(axis=(0, 2))
    assert per_stream.tolist() == [10, 10]                      # and half of every stream


def test_planned_reader_reads_each_row_group_once_per_worker(tmp_path):
    """A worker's ReadRows, fed its plan block by block, reads each of its row groups once and
    returns exactly the planned rows; reading the same rows call by call reads far more."""
    root = make_dataset(str(tmp_path / "big"), n=256, size=8, shards=4, row_group_size=16)
    cfg = DataConfig(datasets=[root], batch_size=16, partitions=2, shuffle_rows=64)
    index = build_index(cfg)
    spe = steps_per_epoch(index, 16)
    keys = {}
    for rank in range(2):
        plan = worker_rows(index, cfg, 0, spe, rank, 2)
        reader = ReadRows(index, cfg, plan=(0, spe, rank, 2))
        out = [reader({"data": np.arange(i, i + 16)}) for i in range(0, len(plan), 16)]   # blocks of 2 steps
        assert np.array_equal(np.concatenate([o["gid"] for o in out]), plan)
        keys[rank] = np.concatenate([o["key"] for o in out])
        own_units = np.unique(index.rows[plan, 2])
        assert reader.group_reads <= len(own_units) + 2, (reader.group_reads, len(own_units))
        assert not reader.held                                   # nothing left behind after the plan
        naive = ReadRows(index, cfg)
        for i in range(0, len(plan), 8):
            naive({"data": plan[i:i + 8]})
        assert naive.group_reads > 2 * reader.group_reads
    assert len(set(keys[0]) & set(keys[1])) == 0 and len(keys[0]) + len(keys[1]) == spe * 16


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
    assert out["image"].shape == (8, 16, 16, 3) and out["image"].dtype == np.uint8      # HWC uint8, as decoded
    assert (out["image"][out["valid"]].max(axis=(1, 2, 3)) > 100).all()      # bright squares on grey
    x = to_model_range(torch.from_numpy(out["image"]))                     # what the train step does on its device
    assert x.shape == (8, 3, 16, 16) and x.min() >= -1 and x.max() <= 1
    np.testing.assert_allclose(x[0, :, 0, 0].numpy(), out["image"][0, 0, 0] / 127.5 - 1, atol=1e-6)
    bad = [k for k, v in zip(out["key"], out["valid"]) if not v]
    assert bad == ["000005"]
    # data.decode_actors=0: the reader decodes in its own actor, and serves the same rows and pixels.
    plan = (0, 4, 1, 2)
    cfg = with_partitions(cfg, 2)
    fused, split = ReadDecode(index, cfg, plan, None, 16), (ReadRows(index, cfg, plan), DecodeCrop(16))
    for block in (np.arange(0, 8), np.arange(8, 16)):
        a, b = fused({"data": block}), split[1](split[0]({"data": block}))
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    data, caption = square_png(0, 16)
    ok = DecodeCrop(8)({"key": np.array(["k"]), "image": np.array([data], dtype=object), "caption": np.array([caption])})
    assert ok["valid"].all() and ok["image"].shape == (1, 8, 8, 3)


def test_batches_come_when_the_train_workers_hold_every_other_cpu(squares, ray_session):
    """A worker's data needs only its reader actor's CPUs: with every other CPU of the cluster held
    (as 2 Train workers hold a 2-core laptop's), the batches still come, in the run's order. (The
    positions once went in through Ray Data's from_numpy, whose 1-CPU task per block then waited for
    a CPU for ever.)"""
    import threading
    import time

    from ray.util.placement_group import placement_group, remove_placement_group

    from jobs.train.data import iter_batches
    from tests.jobs.train.fixtures import G, expected_keys

    cfg = DataConfig(datasets=[squares], batch_size=G, partitions=2, decode_actors=0)
    index = build_index(cfg)
    # The session's instance is shared: an earlier test's actors and placement groups (Ray Data pools,
    # Train runs) are released asynchronously. Wait for its CPUs to come back, then hold every free
    # CPU but the reader's, so the reader gets exactly its own share whatever is still going.
    total, deadline = ray_session.cluster_resources()["CPU"], time.monotonic() + 60
    while ray_session.available_resources().get("CPU", 0) < total and time.monotonic() < deadline:
        time.sleep(0.5)
    free = ray_session.available_resources().get("CPU", 0)
    assert free >= cfg.read_cpus, f"only {free} of the session's {total} CPUs free after 60 s"
    held = placement_group([{"CPU": free - cfg.read_cpus}]) if free > cfg.read_cpus else None
    if held:
        ray_session.get(held.ready(), timeout=120)
    got, errors = [], []

    def read():
        try:
            got.extend(batch["key"] for _, batch in iter_batches(index, cfg, 16, 0, 3, 0, 2))
        except BaseException as err:  # noqa: BLE001 - re-raised below
            errors.append(err)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(120)
    if held:
        remove_placement_group(held)
    assert not reader.is_alive(), "no batches within 120 s with every CPU but the reader's held"
    assert not errors, errors
    assert got == [keys[:G // 2] for keys in expected_keys(squares, range(3))]

"""The xdist groups of tests/conftest.py name real test modules, so a renamed module cannot leave
its fixtures built twice (one copy per worker) or drop out of the slowest-first order unnoticed."""

from pathlib import Path

from tests.conftest import GROUPS, ROOT, SLOWEST_FIRST, _group


def test_groups_and_the_slowest_first_order_name_real_modules():
    for path in GROUPS:
        assert (Path(ROOT) / path).is_file(), f"GROUPS names {path}, which is not a test module"
    for group in SLOWEST_FIRST:
        assert group in GROUPS.values() or (Path(ROOT) / group).is_file(), f"SLOWEST_FIRST names {group}: no such group"
    assert len(set(SLOWEST_FIRST)) == len(SLOWEST_FIRST)


def test_modules_sharing_a_fixture_are_one_group():
    assert _group("tests/jobs/tune/test_schedule.py::test_x") == _group("tests/jobs/train/test_driver.py::test_y")
    assert _group("tests/pipelines/test_fetch.py::a") == _group("tests/jobs/test_generate.py::b") == "node-loss"
    assert _group("tests/model/test_mmjit.py::c") == "tests/model/test_mmjit.py"

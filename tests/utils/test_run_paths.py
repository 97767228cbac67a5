"""utils/run_paths.py: the names of a run's folders and files."""

from utils.run_paths import next_run_id


def test_next_run_id(tmp_path):
    assert next_run_id(tmp_path) == "run_001"
    (tmp_path / "run_001").mkdir()
    (tmp_path / "run_007").mkdir()
    (tmp_path / "run_x").mkdir()
    assert next_run_id(tmp_path) == "run_008"

"""engines/run_dir.py: the names of a run's folders and files."""

from engines.run_dir import next_run_id


def test_next_run_id(tmp_path):
    assert next_run_id(tmp_path) == "run_001"
    (tmp_path / "run_001").mkdir()
    (tmp_path / "run_007").mkdir()
    (tmp_path / "run_x").mkdir()
    assert next_run_id(tmp_path) == "run_008"

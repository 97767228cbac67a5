"""bench/imports.py: the import layers (utils < model < configs < engines < main) and the module length
limit hold for this repository, and the check finds an arrow up and a long module where there is one."""

from __future__ import annotations

from bench.imports import MAX_LINES, arrows_up, graph, long_files


def test_the_repository_has_no_arrow_up_and_no_module_over_the_limit():
    assert arrows_up(graph()) == []
    assert long_files() == []


def test_an_arrow_up_and_a_long_module_are_found(tmp_path):
    for package in ("utils", "model", "configs", "engines"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "main.py").write_text("import engines\n")
    (tmp_path / "configs" / "validator.py").write_text("def f():\n    from engines.checkpoint import x\n")
    (tmp_path / "utils" / "big.py").write_text("x = 1\n" * (MAX_LINES + 1))
    assert arrows_up(graph(tmp_path)) == ["configs.validator -> engines.checkpoint"]
    assert long_files(tmp_path) == [("utils.big", MAX_LINES + 1)]

"""The README's benchmark tables are the results JSON rendered (benchmarks/readme.py): they
cannot drift from the measurements they cite."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("readme_tables", ROOT / "benchmarks" / "readme.py")
readme = importlib.util.module_from_spec(spec)
spec.loader.exec_module(readme)


def test_every_renderer_has_its_block_and_the_readme_is_current():
    text = (ROOT / "README.md").read_text()
    for name in readme.RENDER:
        assert f"<!-- generated: {name} -->" in text, name
    assert readme.render(text) == text, "README tables differ from benchmarks/results: run python benchmarks/readme.py"


def test_a_block_is_replaced_by_what_its_results_render():
    text = "intro\n<!-- generated: step_parts -->\nstale table\n<!-- end generated -->\noutro\n"
    out = readme.render(text)
    assert "stale table" not in out and out.startswith("intro\n") and out.endswith("<!-- end generated -->\noutro\n")
    assert "| drafter attention |" in out and "hivis" in out

"""Run the Python examples of the user guide pages, each page's blocks in order in one namespace."""

import pathlib
import re

import pytest

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"
FAST_PAGES = [
    "index.md",
    "retrieval.md",
    "variational_memory.md",
    "attention_vmf.md",
    "in_context.md",
]
# These two fit models for a few hundred steps each, about 10 s per page on 2 CPU cores.
SLOW_PAGES = ["distributions.md", "dp_memory.md"]


def _python_blocks(page: str) -> list[str]:
    text = (DOCS / page).read_text(encoding="utf-8")
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


@pytest.mark.parametrize(
    "page", FAST_PAGES + [pytest.param(page, marks=pytest.mark.slow) for page in SLOW_PAGES]
)
def test_guide_examples_run(page):
    blocks = _python_blocks(page)
    assert blocks, f"{page} has no python examples"
    namespace = {"__name__": f"docs_{page}"}
    for index, block in enumerate(blocks):
        code = compile(block, f"{page} block {index}", "exec")
        exec(code, namespace)

"""Write a notebook from a list of cells; shared by the notebooks/build_*.py scripts."""

from pathlib import Path

import nbformat


def write_notebook(cells: list[tuple[str, str]], path: Path) -> None:
    """Write ``cells``, pairs of ``(kind, source)`` with kind markdown or code, without outputs."""
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {
        "display_name": "Python 3",
        "language": "python",
        "name": "python3",
    }
    for kind, source in cells:
        if kind == "markdown":
            notebook.cells.append(nbformat.v4.new_markdown_cell(source))
        else:
            notebook.cells.append(nbformat.v4.new_code_cell(source))
    nbformat.write(notebook, path)
    print(f"wrote {path}")

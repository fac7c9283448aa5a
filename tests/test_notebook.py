"""notebooks/evaluate.ipynb runs top to bottom (nbclient) on the quick demo's outputs."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "evaluate.ipynb"


def run_notebook(workdir, demo_env, monkeypatch) -> tuple[list, str]:
    """Execute the notebook on ``workdir`` (holding ``merged/`` and ``data/``) as a user's shell would;
    returns (its code cells' outputs, their text)."""
    for k in list(demo_env):
        monkeypatch.setenv(k, demo_env[k])
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setenv("FLEXMOE_DEMO_DIR", str(workdir))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    return outputs, "".join(o.get("text", "") for o in outputs)


def test_evaluate_notebook_runs_on_quick_demo(quick_demo, demo_env, monkeypatch):
    outputs, text = run_notebook(quick_demo["dir"], demo_env, monkeypatch)
    assert "merged FlexOlmo: experts ['public', 'code', 'math', 'literature', 'humor', 'techdocs']" in text
    assert "| without math |" in text and "largest increase on" in text
    assert "experts: " in text
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the perplexity plot

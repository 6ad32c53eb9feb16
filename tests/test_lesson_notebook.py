"""examples/lesson5.ipynb runs top to bottom (nbclient, a fresh kernel with the user's environment:
no TRITON_INTERPRET from this suite, so on a CPU the ops run their reference, as for a user) and
reaches the lesson's results; it is stored without outputs."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "lesson5.ipynb"


def test_the_notebook_is_stored_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(cell.outputs == [] and cell.execution_count is None for cell in code)


@pytest.mark.slow
def test_the_notebook_runs_top_to_bottom_and_reaches_the_lessons_results(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTCORE5_POISON", "FASTCORE5_BACKEND")}
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=env)  # raises CellExecutionError, naming the cell, when one fails

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    warnings = [output.text for output in outputs if output.output_type == "stream" and output.name == "stderr"]
    assert warnings == []
    assert sum(output.output_type == "display_data" and "image/png" in output.data for output in outputs) == 5
    [line] = [line for output in outputs if output.output_type == "stream"
              for line in output.text.splitlines() if line.startswith("KEY RESULTS ")]
    found = json.loads(line.removeprefix("KEY RESULTS "))

    assert found["collab_valid_mse"] < 0.75 * found["collab_baseline_mse"]  # 0.65 against 1.08 on CPU
    assert found["item_bias_correlation"] > 0.85  # the planted item biases are recovered (0.92)
    assert 0.05 < found["chosen_lr"] < 2.0  # a tenth of the finder's best rate (0.2 on CPU)
    ablation = found["ablation_valid_mse"]
    assert all(mse < found["collab_baseline_mse"] for mse in ablation.values())
    assert ablation["momentum=0.9,wd=0"] < ablation["momentum=0.0,wd=0"] - 0.05  # momentum helps (0.78 vs 0.95)
    assert found["digits_valid_accuracy"] > 0.93  # 98% on CPU

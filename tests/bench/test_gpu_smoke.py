"""``python -m bench.gpu --smoke``: the one-shot GPU command runs end to end on CPU at tiny shapes (Triton
under the interpreter), so it is known to work before a GPU is ever seen; the report has every part, the
device, versions and a timestamp, and says it is a smoke run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PARTS = {"tests", "routing", "gemm", "moe_layer", "train_step", "sampling", "convergence"}


def test_gpu_command_smoke_run_writes_a_complete_report(tmp_path: Path) -> None:
    out = tmp_path / "gpu"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--smoke", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    report = json.loads((out / "gpu.json").read_text())
    assert report["smoke"] is True and set(report["parts"]) == PARTS
    env = report["environment"]
    assert env["torch"] and env["timestamp"] and env["device"].startswith("CPU") and env["triton_interpret"]
    # a part may stop at its budget on a loaded machine (that is the design); none may fail
    errors = {n: r.get("note") for n, r in report["parts"].items() if r["status"] == "error"}
    assert not errors, errors
    assert proc.returncode == (0 if all(r["status"] == "ok" for r in report["parts"].values()) else 1)
    parts = report["parts"]
    # the layer-level parts take well under a second of CPU at the smoke shapes against budgets of 60 s: they
    # must finish, so that the test always checks what they report
    for name in ("routing", "gemm", "moe_layer"):
        assert parts[name]["status"] == "ok", (name, parts[name].get("note"))
    routing, gemm = parts["routing"]["results"], parts["gemm"]["results"]
    assert 0 < routing["routing_share"] and routing["target_routing_share_max"] == 0.02
    assert set(gemm["tflops"]) >= {"dense_cublas", "triton_grouped"} and all(
        v > 0 for v in gemm["tflops"].values()
    )
    assert parts["moe_layer"]["results"]["moe_over_dense"] > 0
    if parts["sampling"]["status"] == "ok":
        rows = parts["sampling"]["results"]["rows"]
        assert (
            set(rows) == {"DiT-XL/2", "RaceDiT-XL/2-4in32"}
            and rows["RaceDiT-XL/2-4in32"]["threshold_routing"]
        )
    if parts["convergence"]["status"] == "ok":
        conv = parts["convergence"]["results"]
        assert len(conv["losses"]["triton"]) == len(conv["losses"]["torch"]) > 0 and conv["agree"]
    if parts["train_step"]["status"] == "ok":
        assert set(parts["train_step"]["results"]["rows"]) == {"DiT-XL/2 eager", "RaceDiT-XL/2-4in32 eager"}
    md = (out / "gpu.md").read_text()
    assert "SMOKE" in md and "python -m bench.gpu --smoke" in md and env["device"] in md

"""Several processes (torchrun + Accelerate, gloo on CPU): features gathered complete and in input order."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np

SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import torch
    sys.path.insert(0, sys.argv[2])
    from fid.data import ArrayImages
    from fid.features import extract_features, process_rank

    class Fake(torch.nn.Module):  # stands in for Inception: features are the image's mean and index pixel
        identity = "fake"
        def features(self, x):
            f = x.float().flatten(1)
            return f[:, :2048].repeat(1, 2048 // f.shape[1] + 1)[:, :2048], f.mean(1, keepdim=True).repeat(1, 2023)

    images = np.arange(7 * 4 * 4 * 3, dtype=np.int64).reshape(7, 4, 4, 3) % 251
    feats = extract_features(ArrayImages(images.astype(np.uint8)), Fake(), batch_size=2, device="cpu",
                             use_cache=False, progress=False)
    if process_rank() == 0:
        np.save(sys.argv[1], feats.pool)
    from racedit.distributed import exit_command, teardown
    teardown()  # as the racedit-fid command does
    exit_command(0)
    """
)


def test_two_processes_gather_in_order(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    out = tmp_path / "pool.npy"
    root = str(__import__("pathlib").Path(__file__).resolve().parents[2])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(out), root]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers: nothing left running
        proc.communicate()
        raise
    assert proc.returncode == 0, err[-3000:]
    assert "terminate called" not in err  # both ranks left the process group cleanly
    images = (np.arange(7 * 4 * 4 * 3).reshape(7, 4, 4, 3) % 251).astype(np.float32)
    pool = np.load(out)
    assert pool.shape == (7, 2048)  # rank 0 had 3 images, rank 1 had 4: padding removed
    nchw = images.transpose(0, 3, 1, 2).reshape(7, -1)  # the extractor sees (B, 3, H, W)
    np.testing.assert_array_equal(pool[:, :48], nchw)  # every image, in the original order

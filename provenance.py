"""What produced a result: recorded in run_config.json (train_sft.py, train_grpo.py) and in an
evaluation's summary.json (evaluate.py), so that a results folder alone tells which weights, code
and settings made it.

    provenance(model_dir, device, dtype) -> {
        "command":  the process's command line (sys.argv, shell-quoted), "cwd": where it ran,
        "model":    hub.model_identity(model_dir): the folder, and the sha256 of its config.json
                    and weight files (each file's own sha256 too, as `sha256sum` prints it),
        "code":     {"commit", "dirty", "changed"} of the git checkout holding this code (None
                    outside a checkout or without git), "dirty" when a tracked file differs
                    from the commit, "changed" naming those files,
        "python", "torch", "device", "dtype", "threads" (torch's intra-op threads), "host"}
"""

import os
import platform
import shlex
import subprocess
import sys

import torch

from hub import model_identity

CODE_DIR = os.path.dirname(os.path.abspath(__file__))


def code_version(path: str = CODE_DIR) -> dict | None:
    """{"commit", "dirty", "changed"} of the git checkout holding `path`; None when there is no
    checkout or no git (files copied without .git, a pip install): a missing answer, not an error."""
    def git(*args):
        return subprocess.run(["git", "-C", path, *args], capture_output=True, text=True, timeout=60,
                              check=True).stdout
    try:
        commit = git("rev-parse", "HEAD").strip()
        # tracked files only: the runs and results a checkout accumulates do not make it dirty
        changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines() if line]
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(changed), "changed": changed}


def provenance(model_dir: str, device, dtype) -> dict:
    """The record described in the module docstring; `model_dir` is the model folder the process
    loaded (already resolved from a run folder's `latest`)."""
    device = torch.device(device)
    name = str(device)
    if device.type == "cuda":
        name += f" ({torch.cuda.get_device_name(device)})"
    return {"command": shlex.join(sys.argv), "cwd": os.getcwd(), "model": model_identity(model_dir),
            "code": code_version(), "python": platform.python_version(), "torch": torch.__version__,
            "device": name, "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
            "host": platform.node()}

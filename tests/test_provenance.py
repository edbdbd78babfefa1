"""The identity of a model folder's weights (hub.model_identity) against coreutils' sha256sum, and
the code version provenance.py reads from git (a commit, a dirty tree, no checkout, no git)."""

import os
import shutil
import subprocess

import pytest
import torch

import hub
import provenance
from data import UserError
from hub import model_identity, write_model_folder


def sha256sum_fingerprint(folder, names):
    """The fingerprint as the shell computes it: `sha256sum NAMES | sha256sum` in the folder."""
    listing = subprocess.run(["sha256sum", *names], cwd=folder, capture_output=True, check=True).stdout
    return subprocess.run(["sha256sum"], input=listing, capture_output=True, check=True).stdout.split()[0].decode()


def tiny_folder(path, max_shard_bytes=1 << 30):
    g = torch.Generator().manual_seed(0)
    tensors = {f"model.layers.{i}.w": torch.randn(64, 64, generator=g) for i in range(4)}
    write_model_folder(str(path), {"model_type": "qwen2_5_vl"}, tensors, torch.float32, max_shard_bytes)
    return path


def test_fingerprint_is_sha256sum_of_config_and_weights(tmp_path):
    one = tiny_folder(tmp_path / "one")
    ident = model_identity(str(one))
    assert ident["folder"] == str(one)
    assert sorted(ident["files"]) == ["config.json", "model.safetensors"]
    assert ident["sha256"] == sha256sum_fingerprint(one, ["config.json", "model.safetensors"])
    # sharded: the index and every shard
    sharded = tiny_folder(tmp_path / "sharded", max_shard_bytes=20_000)
    names = sorted(os.listdir(sharded))
    assert len(names) == 6 and names[-1] == "model.safetensors.index.json"
    assert sorted(model_identity(str(sharded))["files"]) == names
    assert model_identity(str(sharded))["sha256"] == sha256sum_fingerprint(sharded, names)
    # a run folder: the checkpoint its `latest` names
    (tmp_path / "run").mkdir()
    shutil.copytree(one, tmp_path / "run" / "step_3")
    (tmp_path / "run" / "latest").write_text("step_3\n")
    moved = model_identity(str(tmp_path / "run"))
    assert moved["folder"] == str(tmp_path / "run" / "step_3") and moved["sha256"] == ident["sha256"]
    with pytest.raises(UserError, match="not a model folder"):
        model_identity(str(tmp_path))


@pytest.mark.parametrize("where", [0.01, 0.5, 0.999])
def test_fingerprint_changes_with_any_byte_of_the_weights(tmp_path, where):
    """One bit of one weight flipped, at the start, middle or end of the tensor data: the
    fingerprint changes (every byte is read, none sampled)."""
    folder = tiny_folder(tmp_path / "m")
    before = model_identity(str(folder))["sha256"]
    path = folder / "model.safetensors"
    _, base = hub.read_safetensors_header(str(path))
    data = bytearray(path.read_bytes())
    at = base + int((len(data) - base) * where)
    data[at] ^= 1
    path.write_bytes(bytes(data))
    assert model_identity(str(folder))["sha256"] != before


def git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          capture_output=True, text=True, check=True).stdout.strip()


def test_code_version_from_git(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "a.py").write_text("x = 1\n")
    git(repo, "add", "a.py")
    git(repo, "commit", "-q", "-m", "one")
    head = git(repo, "rev-parse", "HEAD")
    (repo / "runs").mkdir()
    (repo / "runs" / "metrics.jsonl").write_text("{}\n")  # untracked output does not make it dirty
    assert provenance.code_version(str(repo)) == {"commit": head, "dirty": False, "changed": []}
    (repo / "a.py").write_text("x = 2\n")
    assert provenance.code_version(str(repo)) == {"commit": head, "dirty": True, "changed": ["a.py"]}
    outside = tmp_path / "copied"  # the files without .git
    outside.mkdir()
    assert provenance.code_version(str(outside)) is None
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no git at all
    assert provenance.code_version(str(repo)) is None


def test_provenance_record(tmp_path, monkeypatch):
    folder = tiny_folder(tmp_path / "m")
    monkeypatch.setattr("sys.argv", ["evaluate.py", "--model", "a b", "--out", "r"])
    rec = provenance.provenance(str(folder), "cpu", torch.bfloat16)
    assert rec["command"] == "evaluate.py --model 'a b' --out r" and rec["cwd"] == os.getcwd()
    assert rec["model"] == model_identity(str(folder))
    assert rec["code"] == provenance.code_version()  # this checkout, or None without one
    assert (rec["torch"], rec["device"], rec["dtype"]) == (torch.__version__, "cpu", "bfloat16")
    assert rec["threads"] == torch.get_num_threads()

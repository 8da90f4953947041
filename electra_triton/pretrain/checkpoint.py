"""Training checkpoints: OUTPUT/checkpoints/step-<N>/, written atomically, verified before loading.

A checkpoint folder holds model.pt, optimizer.pt, state.pt (step, scheduler, per-rank RNG states and data positions,
config) and, written last, manifest.json with every file's size and SHA-256. It is written under a temporary name and
renamed into place, so a crash leaves either a complete checkpoint or a `.tmp-*` folder that is ignored (and removed by
the next save). A folder whose manifest is missing, unreadable, or does not match its files is reported and skipped.
"""

import hashlib
import json
import os
import pathlib
import re
import shutil
from typing import Any

import torch

MANIFEST = "manifest.json"
FORMAT = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_root(output_dir: str | os.PathLike) -> pathlib.Path:
    return pathlib.Path(output_dir) / "checkpoints"


def save_checkpoint(output_dir: str | os.PathLike, step: int, payload: dict[str, Any], keep: int) -> pathlib.Path:
    """Write payload's entries (name -> object for torch.save) as step-<step>/, atomically; keep the newest `keep`."""
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    files = {}
    for name, obj in payload.items():
        path = tmp / f"{name}.pt"
        torch.save(obj, path)
        _fsync(path)
        files[path.name] = {"sha256": _sha256(path), "bytes": path.stat().st_size}
    manifest = tmp / MANIFEST
    manifest.write_text(json.dumps({"format": FORMAT, "step": step, "files": files}, indent=1))
    _fsync(manifest)
    if final.exists():  # a previous run reached the same step before being resumed from an earlier one
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(root)
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir: str | os.PathLike) -> list[pathlib.Path]:
    """step-* folders, oldest first (valid or not)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def verify(folder: pathlib.Path) -> str | None:
    """None if the checkpoint is complete and intact, else why not."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return "no manifest.json (the save was interrupted)"
    except (OSError, ValueError) as error:
        return f"unreadable manifest.json ({error})"
    if manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        return f"manifest.json has an unknown format ({manifest.get('format')})"
    for name, meta in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != meta["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {meta['bytes']}"
        if _sha256(path) != meta["sha256"]:
            return f"{name} does not match its checksum"
    return None


def newest_valid_checkpoint(output_dir: str | os.PathLike, report=print) -> pathlib.Path | None:
    """The newest checkpoint that verifies; every newer broken one is reported through `report` and skipped."""
    for folder in reversed(list_checkpoints(output_dir)):
        problem = verify(folder)
        if problem is None:
            return folder
        report(f"skipping checkpoint {folder}: {problem}")
    return None


def load_checkpoint(folder: pathlib.Path, name: str) -> Any:
    # Our own files (verified against the manifest): optimizer and RNG states need full unpickling.
    return torch.load(folder / f"{name}.pt", map_location="cpu", weights_only=False)

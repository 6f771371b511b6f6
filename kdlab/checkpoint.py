"""Weights and training state on disk: safetensors only (no pickle), checksummed, written atomically.

A file's metadata holds `kdlab` (JSON: epoch, optimizer hyper-parameters, anything small) and
`digest`: sha256 over every tensor's bytes in key order and over the `kdlab` JSON itself, so
truncation and bit flips anywhere in the file, metadata included, are detected on load. (Files of
the first kdlab version carry `sha256`, over the tensors only; they are still read.)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from kdlab.errors import CheckpointError
from kdlab.lock import pid_alive

PICKLE_SUFFIXES = (".pt", ".pth", ".pth.tar", ".bin", ".pkl", ".ckpt")


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def file_digest(tensors: dict[str, torch.Tensor], meta_json: str | None) -> str:
    h = hashlib.sha256(tensors_digest(tensors).encode())
    h.update(b"\0kdlab\0" + (meta_json.encode() if meta_json is not None else b"\0absent"))
    return h.hexdigest()


TEMP_NAME = re.compile(r"^\..+\.tmp(\d+)$")


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete the half-written temp files of writers that died (SIGKILL, power loss) in `folder`."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = TEMP_NAME.match(entry.name)
        if match and int(match.group(1)) != os.getpid() and not pid_alive(int(match.group(1))):
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Temp file in the same folder, fsync, rename: a reader sees the old file or the new one, never half."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"could not create {path.parent}: {e.strerror or e}") from None
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # Ctrl-C mid-write must not leave the temp file behind either
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise CheckpointError(f"could not write {path}: {e.strerror or e}") from None
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> None:
    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta_json = json.dumps(meta or {})
    metadata = {"kdlab": meta_json, "digest": file_digest(cpu, meta_json)}
    atomic_write_bytes(Path(path), st_save(cpu, metadata=metadata))


def _read_metadata(raw: bytes) -> dict[str, str]:
    if len(raw) < 8:
        raise ValueError("file too short")
    n = int.from_bytes(raw[:8], "little")
    if n <= 0 or 8 + n > len(raw):
        raise ValueError("header length out of range (truncated file?)")
    try:
        header = json.loads(raw[8 : 8 + n])
    except UnicodeDecodeError:
        raise ValueError("its header is not UTF-8 text") from None
    if not isinstance(header, dict):
        raise ValueError(f"its header is a JSON {type(header).__name__}, not an object")
    return header.get("__metadata__") or {}


def load(path: str | Path, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and kdlab metadata; CheckpointError naming the file for anything wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.name.endswith(PICKLE_SUFFIXES):
        raise CheckpointError(
            f"{path}: kdlab reads weights only from safetensors files (see load_weights for .pt files)"
        )
    raw = b""
    try:
        raw = path.read_bytes()
        metadata = _read_metadata(raw)
        tensors = st_load(raw)
    except (SafetensorError, ValueError, UnicodeDecodeError, OSError, RuntimeError) as e:
        if raw[:1] == b"\x80" or raw[:2] == b"PK":
            raise CheckpointError(
                f"{path}: a pickle or torch.save file, not safetensors; kdlab never unpickles checkpoints"
            ) from None
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from None
    if verify:
        _verify(path, tensors, metadata)
    try:
        meta = json.loads(metadata.get("kdlab", "{}"))
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: unreadable kdlab metadata") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: its kdlab metadata is a JSON {type(meta).__name__}, not an object")
    return tensors, meta


def _verify(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    if "digest" in metadata:
        ok = file_digest(tensors, metadata.get("kdlab")) == metadata["digest"]
    elif "sha256" in metadata:
        ok = tensors_digest(tensors) == metadata["sha256"]
    elif "kdlab" in metadata:  # written by kdlab, so its checksum key itself was damaged
        ok = False
    else:
        return  # a safetensors file from another tool: nothing to check against
    if not ok:
        raise CheckpointError(f"{path}: checksum mismatch (the file was modified or damaged)")


# entries under which the reference implementations' torch.save'd checkpoints hold the state dict:
# RepDistiller and mdistiller {"model": ...} (with "epoch", "accuracy"/"best_acc" or "opt"), teacher-free
# KD {"state_dict": ...} (with "epoch", "optim_dict")
STATE_ENTRIES = ("model", "state_dict")


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file, or from a torch file through weights_only=True (no code runs).

    A torch file may hold the state dict itself or a dict with it under ``model`` or ``state_dict`` (the
    reference implementations' checkpoints). Key names are returned as stored; see
    ``kdlab.models.reference_keys.adapt`` for the reference implementations' names.
    """
    path = Path(path)
    if path.name.endswith(".safetensors"):
        return load(path)[0]
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        # RepDistiller's *_last.pth also stores its argparse options; a Namespace is rebuilt from plain
        # values by setting attributes, no code of the file runs, so it is allowed next to the tensors
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only raises it for any global outside the allowed tensors
        # torch's own message goes on to advise disabling the safeguard: kdlab names what was refused instead
        refused = re.search(r"GLOBAL (\S+)", str(e)) or re.search(r"Unsupported global: (\S+)", str(e))
        what = f" ({refused.group(1)})" if refused else ""
        raise CheckpointError(
            f"{path}: refused, it holds Python objects{what} besides tensors, which would run code when loaded; "
            "kdlab will not load it. If you trust the file, convert it in your own Python session: load it there "
            "and save only its state dict with safetensors.torch.save_file or torch.save"
        ) from None
    except Exception as e:
        raise CheckpointError(
            f"{path}: unreadable torch file ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None
    if isinstance(obj, dict):
        for entry in STATE_ENTRIES:
            if isinstance(obj.get(entry), dict):
                obj = obj[entry]
                break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(
            f"{path}: expected a state dict of tensors (or a dict with one under 'model' or 'state_dict')"
        )
    bad = next((k for k, v in obj.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise CheckpointError(
            f"{path}: entry {bad!r} is a {type(obj[bad]).__name__}, not a tensor; expected a state dict "
            "(or a dict with one under 'model' or 'state_dict')"
        )
    return obj


def load_state_into(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict with a one-line error naming the file and the first mismatching keys or shapes."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}")
        if wrong:
            parts.append(f"shape {', '.join(wrong[:2])}")
        raise CheckpointError(f"{source}: weights do not fit {type(module).__name__} ({'; '.join(parts)})")
    module.load_state_dict(state)

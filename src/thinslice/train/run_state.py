"""Training state on disk without pickle: every object a checkpoint keeps (weights, optimiser, LR schedule, EMA,
sampler, random generators) as a pair of files, ``<name>.safetensors`` (its tensors and arrays) and ``<name>.json``
(everything else, with a placeholder where each tensor was).

Why not Accelerate's ``save_state``/``load_state``: they store optimiser, scheduler, RNG and registered objects with
``torch.save`` (pickle), and load the registered ones with torch's unsafe unpickler (``weights_only`` off), so a
crafted file in a run folder runs code on ``--resume``. Reading a pair here builds only dicts, lists, tuples,
numbers, strings, tensors and numpy arrays (the JSON decoder and safetensors cannot build anything else), whatever
the files hold.

The encoding is hand-written because no library stores nested Python state (int dict keys, tuples, numpy arrays,
big integers of a generator state) safely; it is small: a tensor is ``{"__tensor__": key}``, a numpy array
``{"__ndarray__": key, "dtype": ..., "shape": ...}`` (its bytes as a uint8 tensor), a tuple ``{"__tuple__": [...]}``
and a dict ``{"__dict__": [[key, value], ...]}`` (JSON keys are strings only; optimiser state is keyed by ints).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from thinslice.errors import ThinsliceError

_SCALARS = (bool, int, float, str, type(None))


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """``obj`` as JSON-able data, its tensors and arrays moved into ``tensors`` under fresh keys."""
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = str(len(tensors))
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj).reshape(-1).view(np.uint8).copy())
        return {"__ndarray__": key, "dtype": obj.dtype.str, "shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, _SCALARS):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        return {"__dict__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    raise TypeError(f"training state holds a {type(obj).__name__}, which a checkpoint cannot store without pickle")


def _decode(data: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`_encode`."""
    if isinstance(data, list):
        return [_decode(v, tensors) for v in data]
    if not isinstance(data, dict):
        return data
    if "__tensor__" in data:
        return tensors[data["__tensor__"]]
    if "__ndarray__" in data:
        raw = tensors[data["__ndarray__"]].numpy()
        return raw.view(np.dtype(data["dtype"])).reshape(data["shape"]).copy()
    if "__tuple__" in data:
        return tuple(_decode(v, tensors) for v in data["__tuple__"])
    if "__dict__" in data:
        return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in data["__dict__"]}
    raise ValueError(f"unexpected entry in a training state file: {sorted(data)[:3]}")


def _hashable(key: Any) -> Any:
    if isinstance(key, (list, dict)):
        raise ValueError("a training state file has a dict key that is not a number, string or tuple")
    return key


def state_files(folder: Path, name: str) -> tuple[Path, Path]:
    """The two files of state ``name`` in ``folder``."""
    return folder / f"{name}.safetensors", folder / f"{name}.json"


def write_state(folder: Path, name: str, state: Any) -> None:
    """Store ``state`` (nested dicts/lists/tuples of tensors, arrays and scalars) as ``name``'s two files."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(state, tensors)
    tensor_path, json_path = state_files(folder, name)
    save_file(tensors, str(tensor_path))
    json_path.write_text(json.dumps(skeleton))


def read_state(folder: Path, name: str) -> Any:
    """State ``name`` as written by :func:`write_state` (tensors on the CPU). A missing or damaged file raises
    (OSError, ValueError or safetensors' error): the caller decides whether an older checkpoint will do."""
    tensor_path, json_path = state_files(folder, name)
    tensors = load_file(str(tensor_path), device="cpu")
    return _decode(json.loads(json_path.read_text()), tensors)


# ------------------------------------------------------------------------------------------ random generators
def rng_state() -> dict[str, Any]:
    """The Python, numpy (legacy global) and torch generators of this process (CUDA ones when present)."""
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Continue the generator streams saved by :func:`rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Files a thinslice checkpoint never holds: pickle-based formats (Accelerate's custom_checkpoint_*.pkl,
# random_states_*.pkl, optimizer.bin, torch .pt files), which can run code when read.
PICKLE_SUFFIXES = (".pkl", ".pickle", ".bin", ".pt", ".pth", ".ckpt")


def refuse_pickles(folder: Path, older_format: bool) -> None:
    """One line naming the first pickle file in checkpoint ``folder``, which is never read: an older thinslice
    wrote such checkpoints (``older_format``), otherwise the file was put there by something else."""
    found = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if older_format:
        name = found[0] if found else "its files"
        raise ThinsliceError(
            f"--resume: {folder} was saved by an older thinslice (Accelerate's pickle files such as {name}, which "
            "thinslice no longer reads because loading them can run code); start a new run (another --out), or "
            "finish this one with the thinslice version that started it"
        )
    if found:
        raise ThinsliceError(
            f"--resume: refused {folder / found[0]}: thinslice checkpoints hold no pickle files and it was not read "
            "(loading one can run code); delete it if you trust this folder, or start a new run (another --out)"
        )

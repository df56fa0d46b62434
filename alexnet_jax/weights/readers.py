"""Weight files read and written safely, whatever layout they hold: nothing in a file runs.

- Caffe's .npy (caffe-tensorflow's pickled {layer: [weights, biases]} dict, Python 2 or 3):
  a restricted unpickler that rebuilds numpy arrays and plain containers only.
- State dicts: .pth/.pt through PyTorch with weights_only=True, .safetensors, and .npz
  without pickles. torch and safetensors are needed only for their own files.

Which layout the tensors are in, and its conversion to ours, is layouts.py's.
"""

from __future__ import annotations

import codecs
import os
import pickle
import zipfile
from typing import Any, Mapping

import numpy as np

from alexnet_jax.core import files
from alexnet_jax.core.errors import UserInputError

STATE_DICT_SUFFIXES = (".pth", ".pt", ".safetensors", ".npz")
SUFFIXES = STATE_DICT_SUFFIXES + (".npy",)  # every weights file: state dicts and Caffe's .npy

_NUMPY_GLOBALS = {
  ("numpy.core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
  ("numpy._core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
  ("numpy", "ndarray"): np.ndarray,
  ("numpy", "dtype"): np.dtype,
  ("_codecs", "encode"): codecs.encode,  # how Python 3 pickles bytes at protocol 2
}


class _Refused(pickle.UnpicklingError):
  pass


class _ArraysOnly(pickle.Unpickler):
  """Rebuilds numpy arrays and plain containers; refuses every other global, so nothing in
  the file can run."""

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) not in _NUMPY_GLOBALS:
      raise _Refused(f"{module}.{name}")
    return _NUMPY_GLOBALS[module, name]


def read_caffe_npy(path: str) -> dict:
  """The {layer: [weights, biases]} dict of a caffe-tensorflow .npy (written by Python 2 or 3)."""
  readers = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
  }
  with open(path, "rb") as f:
    try:
      version = np.lib.format.read_magic(f)
      shape, _, dtype = readers[version](f)
    except (ValueError, KeyError) as e:
      raise UserInputError(f"{path} is not a .npy file numpy can read ({e})") from None
    if dtype != np.dtype(object) or shape != ():
      raise UserInputError(
        f"{path} holds a {dtype} array of shape {shape}, not Caffe's pickled "
        "{layer: [weights, biases]} dict"
      )
    try:
      layers = _ArraysOnly(f, encoding="latin1").load().item()
    except _Refused as e:
      raise UserInputError(
        f"refusing {path}: its pickle calls {e}, and a Caffe AlexNet .npy holds only numpy "
        "arrays, lists and dicts; nothing was loaded"
      ) from None
    except Exception as e:  # truncated or corrupt
      raise UserInputError(f"cannot read {path}: {type(e).__name__}: {e}") from None
  if not isinstance(layers, dict):
    raise UserInputError(
      f"{path} holds a {type(layers).__name__}, not Caffe's {{layer: [weights, biases]}} dict"
    )
  return layers


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """A .pth/.pt (torch, weights only), .safetensors or .npz state dict as numpy arrays."""
  suffix = os.path.splitext(path)[1].lower()
  if suffix in (".pth", ".pt"):
    torch = _need("torch", path)
    try:
      tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's refusal of pickled code, or a corrupt file
      raise UserInputError(
        f"{path} is not a state dict PyTorch loads with weights_only=True: {str(e).splitlines()[0]}"
      ) from None
    if not isinstance(tensors, Mapping) or not all(
      isinstance(v, torch.Tensor) for v in tensors.values()
    ):
      raise UserInputError(f"{path} holds a {type(tensors).__name__}, not a state dict of tensors")
    return {k: v.detach().float().numpy() for k, v in tensors.items()}
  if suffix == ".safetensors":
    load_file = _need("safetensors.numpy", path).load_file
    try:
      return dict(load_file(path))
    except Exception as e:  # safetensors' own error types
      raise UserInputError(f"cannot read {path} as safetensors: {str(e).splitlines()[0]}") from None
  if suffix == ".npz":
    try:
      with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
    except ValueError as e:  # pickled objects, which allow_pickle=False refuses to run
      raise UserInputError(f"refusing {path}: {e}") from None
    except (OSError, zipfile.BadZipFile) as e:
      raise UserInputError(f"cannot read {path} as .npz: {e}") from None
  raise UserInputError(
    f"unknown weights format {suffix or path!r} of {path}; use a state dict "
    f"({', '.join(STATE_DICT_SUFFIXES)}) or Caffe's .npy"
  )


def write_state_dict(tensors: Mapping[str, np.ndarray], path: str) -> None:
  """Writes under a temporary name first: an export killed mid-write leaves no bad file."""
  suffix = os.path.splitext(path)[1].lower()
  if suffix in (".pth", ".pt"):
    torch = _need("torch", path)
    with files.atomic_path(path) as tmp:
      torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}, tmp)
  elif suffix == ".safetensors":
    save_file = _need("safetensors.numpy", path).save_file
    with files.atomic_path(path) as tmp:
      save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp)
  elif suffix == ".npz":
    with files.atomic_path(path) as tmp:
      np.savez(tmp, **tensors)
  else:
    raise UserInputError(
      f"unknown weights format {suffix or path!r} of {path}; use {', '.join(STATE_DICT_SUFFIXES)}"
    )


def _need(module: str, path: str) -> Any:
  try:
    return __import__(module, fromlist=["_"])
  except ImportError:
    raise UserInputError(
      f"{path} needs the {module.split('.')[0]} package: pip install "
      f"{module.split('.')[0]}, or use a .npz state dict"
    ) from None

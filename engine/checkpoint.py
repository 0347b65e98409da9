"""Load a Hugging Face safetensors checkpoint into a dict of tensors, validated against config.json.

`load_checkpoint(path)` reads `config.json` into a `ModelConfig`, finds the safetensors files
(`model.safetensors`, shards listed by `model.safetensors.index.json`, or any `*.safetensors`),
checks every tensor name and shape against `ModelConfig.expected_tensor_shapes()` before reading
any data, then reads the tensors one at a time with `safetensors.safe_open`, converting each to the
requested dtype and moving it to the requested device. Pickle checkpoints (`*.bin`, `*.pt`) are
never loaded: unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from .config import ModelConfig

_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}
_STORED_DTYPES = {"BF16", "F16", "F32"}
# Buffers some exporters save that the engine recomputes.
_HARMLESS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_PICKLE_GLOBS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


class CheckpointError(ValueError):
    """A checkpoint that does not match its config or cannot be read; the message names the tensor."""


def resolve_dtype(dtype: torch.dtype | str | None, config: ModelConfig) -> torch.dtype:
    """`dtype` as a torch dtype; None means the checkpoint's declared torch_dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise CheckpointError(f"dtype: {dtype} is not supported (bfloat16, float16, float32)")
        return dtype
    name = (config.torch_dtype if dtype is None else dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise CheckpointError(f"dtype: {name!r} is not supported (bfloat16, float16, float32)")
    return _DTYPES[name]


def _weight_files(root: Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file holding it (names are not validated here)."""
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index.name}: no readable weight_map ({e})") from e
        files: dict[str, Path] = {}
        for name, fname in weight_map.items():
            file = root / fname
            if not file.is_file():
                raise CheckpointError(f"{name}: shard {fname} listed in {index.name} is missing")
            files[name] = file
        return files

    single = root / "model.safetensors"
    candidates = [single] if single.is_file() else sorted(root.glob("*.safetensors"))
    if not candidates:
        pickles = sorted(p.name for g in _PICKLE_GLOBS for p in root.glob(g))
        hint = (
            f" (found {', '.join(pickles[:3])}: .bin/pickle checkpoints are not loaded, for "
            "safety; convert them to safetensors)"
            if pickles
            else " (.bin/pickle checkpoints are not loaded, for safety)"
        )
        raise CheckpointError(f"model: no *.safetensors files in {root}{hint}")
    files = {}
    for file in candidates:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if name in files:
                    raise CheckpointError(
                        f"{name}: present in both {files[name].name} and {file.name}"
                    )
                files[name] = file
    return files


def _validate(config: ModelConfig, files: dict[str, Path]) -> list[str]:
    """Check names, shapes and stored dtypes; return the names to load, in file order."""
    expected = config.expected_tensor_shapes()
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)

    to_load: list[str] = []
    unexpected: list[str] = []
    for file, names in by_file.items():
        with safe_open(file, framework="pt") as f:
            present = set(f.keys())
            for name in names:
                if name not in present:
                    raise CheckpointError(
                        f"{name}: listed in the index but absent from {file.name}"
                    )
                if name not in expected:
                    if _HARMLESS.search(name):
                        continue
                    if name == "lm_head.weight" and config.tie_word_embeddings:
                        continue  # tied: the engine reuses model.embed_tokens.weight
                    unexpected.append(name)
                    continue
                sl = f.get_slice(name)
                stored = sl.get_dtype()
                if stored not in _STORED_DTYPES:
                    raise CheckpointError(
                        f"{name}: stored as {stored}; only BF16, F16 and F32 tensors are supported "
                        "(quantized checkpoints are not)"
                    )
                shape = tuple(sl.get_shape())
                if shape != expected[name]:
                    raise CheckpointError(
                        f"{name}: shape {shape} in checkpoint, expected {expected[name]} "
                        "from config.json"
                    )
                to_load.append(name)

    if unexpected:
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise CheckpointError(
            f"unexpected tensors not used by {config.architecture}: "
            f"{', '.join(sorted(unexpected)[:5])}{more}"
        )
    missing = [n for n in expected if n not in files]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        hint = (
            " (config.json has tie_word_embeddings false, so the checkpoint needs its own "
            "lm_head.weight)"
            if "lm_head.weight" in missing
            else ""
        )
        raise CheckpointError(f"missing tensors: {', '.join(missing[:5])}{more}{hint}")
    return to_load


def load_checkpoint(
    path: str | Path,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a Hugging Face model directory: (config, tensors keyed by their Hugging Face names).

    Tensors are converted to `dtype` (default: the checkpoint's torch_dtype) and placed on
    `device`. With tied embeddings the result has no `lm_head.weight`.
    """
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"model: {path} is not a directory")
    config = ModelConfig.from_dir(root)
    target = resolve_dtype(dtype, config)
    device = torch.device(device)
    files = _weight_files(root)
    names = _validate(config, files)

    tensors: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    for file, file_names in by_file.items():
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in file_names:
                t = f.get_tensor(name)
                # Narrow before the copy to the device, widen after it: fewer bytes travel.
                if t.element_size() > torch.empty((), dtype=target).element_size():
                    t = t.to(target)
                tensors[name] = t.to(device=device, dtype=target)
    return config, tensors

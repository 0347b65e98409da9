"""No serving-path code builds a device tensor from host values with `torch.tensor(..., device=)`
or `torch.as_tensor(..., device=)`: on a GPU that is a pageable copy after which the host waits
for the stream, and inside a prefill or a decode step the GPU then idles for every launch after
it (H100, session 17: the compressed caches' page ids cost hack2's export 11 ms of a 4k prefill).
Host values go through compress/device_copy.py (`index_on`, `to_device_nowait`, `pinned`). The
GPU tests (test_device_path_gpu.py, test_engine_gpu.py, test_sampling.py) check the waits
themselves; this one keeps CI, which has no GPU, from letting the pattern back in."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVING = (
    "engine",
    "compress",
    "kernels",
    "decode_worker",
    "prefill_worker",
    "transfer",
    "router",
    "control",
    "prefill_group",
)
ALLOWED = {
    # once per prompt, right before the rank's own synchronize that starts its timing
    "prefill_group/rank.py",
}


def _device_tensor_calls(path: Path) -> list[int]:
    """Lines of `torch.tensor(...)` / `torch.as_tensor(...)` calls that pass `device=`."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("tensor", "as_tensor")
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "torch"
            and any(k.arg == "device" for k in node.keywords)
        ):
            lines.append(node.lineno)
    return lines


def test_serving_code_builds_no_device_tensor_from_host_values():
    found = []
    for folder in SERVING:
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel not in ALLOWED:
                found += [f"{rel}:{line}" for line in _device_tensor_calls(path)]
    assert found == [], "use compress/device_copy.py (index_on / to_device_nowait): " + ", ".join(
        found
    )


def test_the_scan_finds_the_pattern(tmp_path):
    """The check can fail: it flags both forms and leaves host-only tensors alone."""
    src = tmp_path / "m.py"
    src.write_text(
        "import torch\n"
        "a = torch.tensor([1], device='cuda')\n"
        "b = torch.as_tensor([1], dtype=torch.long, device=dev)\n"
        "c = torch.tensor([1], dtype=torch.long)\n"
    )
    assert _device_tensor_calls(src) == [2, 3]

"""CUDA graphs on a full-size SDXL pipeline: the same images, the time and the joules (issue #8).

    python bench/gpu_graphs.py --out DIR            # an NVIDIA GPU; about 3 minutes on an H200
    python bench/gpu_graphs.py --smoke --out DIR    # any CPU: tiny-sdxl, eager only (the script's path)

`backends/cuda_graphs.py` was first run on a GPU with Stable Diffusion 1.5, whose UNet takes three
inputs. SDXL's UNet also takes added conditions (a dict of tensors: pooled text embeddings and time
ids). With `sdxl` (float16, random weights of the real architecture, `cuda_graphs = true`), this
script measures:

1. The first call against the second: what the first request pays where the server has not warmed
   the model up (`warmup = "auto"` runs one small request before the server takes any): CUDA's and
   the libraries' first-call costs, and the graph's two eager warm-up runs and capture.
2. At batch 1 and batch 2 (1024x1024, 30 steps): the same requests replayed and run eagerly, and how
   far apart their images are (8-bit levels); then calls with and without graphs, alternated, with
   each call's duration and its joules on the device's NVML counter (read before and after the call,
   once the device is synchronized; a counter step is about 100 ms, so a call of seconds reads its
   energy to within a few percent).
3. A capture that fails: a hook that reads a tensor's value back to the host (`.item()`, which a
   graph cannot hold) is put inside the UNet, and a request of a new shape is sent. The capture must
   fail, be logged, and the call run eagerly with the image it would have had without graphs; the
   thread's current stream must be the default one again; and with the hook gone, a later new shape
   must capture and replay as usual.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/gpu_graphs.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import logging
import time
from collections.abc import Sequence
from typing import Any

from bench.common import (
    common_args,
    default_cache_dir,
    machine_info,
    machine_markdown,
    md_table,
    median,
    print_flush,
    quiet_logging,
    status_marker,
    write_result,
)

NAME = "gpu_graphs"
PROMPT = "an oil painting of a lighthouse on a rocky coast at sunset, number {}"


class _Capturing(logging.Handler):
    """Keeps the records logged by backends.cuda_graphs (the failed capture's)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/gpu_graphs.py", description=__doc__.splitlines()[0])
    common_args(parser)
    parser.add_argument("--cache-dir", type=Path, default=None, help="model cache (default: the service's)")
    parser.add_argument("--rounds", type=int, default=3, help="alternated calls with and without graphs")
    args = parser.parse_args(argv)
    quiet_logging()
    import numpy as np
    import torch

    from backends import load_backend
    from backends.base import ImageRequest
    from backends.tiny import ensure_model

    smoke = args.smoke
    device, dtype, preset, side, steps = (
        ("cpu", "float32", "tiny-sdxl", 64, 2) if smoke else ("cuda:0", "float16", "sdxl", 1024, 30)
    )
    small_side = side // 2  # the new shapes of part 3: cheaper than the full size
    cache = (args.cache_dir or default_cache_dir()) / "models"
    info = machine_info(gpu=not smoke)
    probe: Any = None
    if not smoke:
        from bench.gpu_energy import NvmlProbe

        probe = NvmlProbe(device)
        info["gpu"] = probe.name
    t0 = time.perf_counter()
    print_flush(f"building/loading {preset} ...")
    path = ensure_model(preset, cache, dtype=dtype)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    backend = load_backend("image", preset, path, device=device, dtype=dtype, cuda_graphs=not smoke)
    load_s = time.perf_counter() - t0
    print_flush(f"built in {build_s:.1f} s, loaded in {load_s:.1f} s")
    graphs = backend.graphs  # None in the smoke run (no CUDA)

    def requests(first: int, batch: int, size: int = side) -> list[ImageRequest]:
        return [
            ImageRequest(
                prompt=PROMPT.format(first + j), width=size, height=size, steps=steps, seed=first + j
            )
            for j in range(batch)
        ]

    def set_graphs(on: bool) -> None:
        if graphs is not None:
            graphs.enabled = on

    def call(batch: list[ImageRequest], on: bool) -> tuple[float, float | None, list[Any]]:
        """One pipeline call: its seconds, its joules on the counter (None without NVML), its images."""
        set_graphs(on)
        backend.synchronize()
        e0 = probe.energy_j() if probe is not None else None
        start = time.perf_counter()
        results = backend.run(batch)
        backend.synchronize()
        seconds = time.perf_counter() - start
        joules = probe.energy_j() - e0 if probe is not None and e0 is not None else None
        set_graphs(True)
        return seconds, joules, [np.asarray(im, dtype=np.int16) for r in results for im in r.images]

    def apart(a: list[Any], b: list[Any]) -> dict[str, Any]:
        diffs = [np.abs(x - y) for x, y in zip(a, b, strict=True)]
        return {
            "images": len(diffs),
            "max_abs_level_diff": int(max(int(d.max()) for d in diffs)),
            "differing_values_share": float(
                sum(int((d > 0).sum()) for d in diffs) / sum(d.size for d in diffs)
            ),
        }

    def memory() -> dict[str, float] | None:
        if smoke:
            return None
        return {
            "allocated_gib": torch.cuda.memory_allocated() / 2**30,
            "reserved_gib": torch.cuda.memory_reserved() / 2**30,
        }

    data: dict[str, Any] = {
        "benchmark": NAME,
        "smoke": smoke,
        "machine": info,
        "command": "python bench/gpu_graphs.py" + (" --smoke" if smoke else "") + f" --rounds {args.rounds}",
        "model": {"preset": preset, "dtype": dtype, "device": device, "size": side, "steps": steps},
        "build_s": build_s,
        "load_s": load_s,
        "memory_loaded": memory(),
    }

    # 1. the first call, cold, against the second
    first_s, _, _ = call(requests(0, 1), True)
    second_s, _, _ = call(requests(1, 1), True)
    data["first_call_s"], data["second_call_s"] = first_s, second_s
    print_flush(f"first call {first_s:.2f} s, second {second_s:.2f} s")

    # 2. graphs against eager at batch 1 and 2
    batches: dict[str, Any] = {}
    for batch in (1, 2):
        same = requests(10_000, batch)
        g_s, _, with_graphs = call(same, True)  # (batch 2: its capture happens here)
        _, _, eager = call(same, False)
        entry: dict[str, Any] = {"first_graphs_call_s": g_s, **apart(with_graphs, eager), "memory": memory()}
        timed: dict[str, list[tuple[float, float | None]]] = {"graphs": [], "eager": []}
        for r in range(args.rounds):
            for on in (True, False) if r % 2 == 0 else (False, True):
                s, j, _ = call(requests(20_000 + 100 * r + 10 * batch, batch), on)
                timed["graphs" if on else "eager"].append((s, j))
        for mode, calls in timed.items():
            entry[mode] = {
                "call_s": [s for s, _ in calls],
                "call_s_median": median(s for s, _ in calls),
                "j_per_image_median": None if smoke else median(j / batch for _, j in calls if j is not None),
            }
        batches[f"batch {batch}"] = entry
        print_flush(f"batch {batch}: {entry}")
    data["batches"] = batches

    # 3. a capture that fails, then a capture after it
    fallback: dict[str, Any] = {"run": graphs is not None}
    if graphs is not None:
        captures_before = graphs.captures
        logger = logging.getLogger("backends.cuda_graphs")
        handler = _Capturing()
        logger.addHandler(handler)
        unet = backend._loaded().unet

        def read_back(module: Any, inputs: tuple[Any, ...]) -> None:
            inputs[0].sum().item()  # a device-to-host copy and a wait: not allowed in a capture

        hook = unet.conv_in.register_forward_pre_hook(read_back)
        try:
            new_shape = requests(30_000, 1, small_side)
            failed_s, _, failed = call(new_shape, True)
        finally:
            hook.remove()
            logger.removeHandler(handler)
        fallback["failed_call_s"] = failed_s
        fallback["logged"] = [m.splitlines()[0] for m in handler.messages]
        fallback["captures_added_by_failed_shape"] = graphs.captures - captures_before
        fallback["uncapturable_shapes"] = len(graphs._uncapturable)
        fallback["default_stream_after"] = bool(torch.cuda.current_stream() == torch.cuda.default_stream())
        _, _, failed_eager = call(new_shape, False)
        fallback["failed_shape_vs_eager"] = apart(failed, failed_eager)
        again_s, _, again = call(new_shape, True)  # the shape stays eager: no second try
        fallback["failed_shape_again_s"] = again_s
        fallback["failed_shape_again_vs_eager"] = apart(again, failed_eager)
        later = requests(40_000, 2, small_side)
        later_s, _, later_graphs = call(later, True)
        _, _, later_eager = call(later, False)
        fallback["later_shape_call_s"] = later_s
        fallback["later_shape_captured"] = graphs.captures - captures_before
        fallback["later_shape_vs_eager"] = apart(later_graphs, later_eager)
        fallback["shapes_now"] = graphs.shapes
        print_flush(f"fallback: {fallback}")
    data["fallback"] = fallback
    data["memory_end"] = memory()
    backend.close()
    if probe is not None:
        probe.close()
    md_path, _ = write_result(args.out, NAME, render(data), data)
    print_flush(f"wrote {md_path}")
    return 0


def render(data: dict[str, Any]) -> str:
    m = data["model"]
    rows = []
    for name, entry in data["batches"].items():
        g, e = entry["graphs"], entry["eager"]
        rows.append(
            [
                name,
                entry["images"],
                entry["max_abs_level_diff"],
                f"{entry['differing_values_share']:.4%}",
                e["call_s_median"],
                g["call_s_median"],
                e["call_s_median"] / g["call_s_median"],
                "-" if e["j_per_image_median"] is None else e["j_per_image_median"],
                "-" if g["j_per_image_median"] is None else g["j_per_image_median"],
                "-" if entry["memory"] is None else f"{entry['memory']['reserved_gib']:.1f}",
            ]
        )
    table = md_table(
        [
            "batch",
            "images compared",
            "max abs difference (8-bit levels)",
            "values that differ",
            "call s eager (median)",
            "call s graphs (median)",
            "speed-up",
            "J/image eager",
            "J/image graphs",
            "GiB reserved after its capture",
        ],
        rows,
    )
    f = data["fallback"]
    if f["run"]:
        fallback = f"""A capture that fails (a hook inside the UNet reads a value back to the host with
`.item()`; {m["size"] // 2}x{m["size"] // 2}, batch 1, a shape not yet seen):

- logged: {"; ".join(f"`{x}`" for x in f["logged"]) or "nothing"}
- graphs captured for it: {f["captures_added_by_failed_shape"]}; shapes marked to run eagerly:
  {f["uncapturable_shapes"]}; the thread's current stream the default one afterwards:
  {"yes" if f["default_stream_after"] else "no"}
- its image against an eager call's: max difference {f["failed_shape_vs_eager"]["max_abs_level_diff"]}
  levels; the same shape sent again (eager, no second capture):
  {f["failed_shape_again_vs_eager"]["max_abs_level_diff"]} levels, {f["failed_shape_again_s"]:.2f} s
- with the hook gone, a new shape ({m["size"] // 2}x{m["size"] // 2}, batch 2) captured
  ({f["later_shape_captured"]} graph(s) since the failure) and replayed: max difference
  {f["later_shape_vs_eager"]["max_abs_level_diff"]} levels against eager; {f["shapes_now"]} shapes held now.
"""
    else:
        fallback = "The capture-failure part needs a CUDA device: not run (smoke run, eager only).\n"
    memory = data.get("memory_loaded")
    return f"""## CUDA graphs on SDXL: the same images, the time and the joules (bench/gpu_graphs.py)

{status_marker(NAME, "smoke" if data["smoke"] else "ok")}

Command: `{data["command"]}`

{machine_markdown(data["machine"])}

- `{m["preset"]}` ({m["dtype"]}, {m["size"]}x{m["size"]}, {m["steps"]} steps, random weights of the real
  architecture) on `{m["device"]}`, `cuda_graphs = true`: the UNet's forward passes (with SDXL's added
  conditions, a dict of tensors) replayed as CUDA graphs, one per input shape; built in
  {data["build_s"]:.0f} s, loaded in {data["load_s"]:.1f} s{
        "" if memory is None else f" ({memory['allocated_gib']:.1f} GiB allocated)"
    }.
- First call after loading (cold: the libraries' first calls, the graph's two eager warm-up runs and
  its capture) {data["first_call_s"]:.2f} s; the second {data["second_call_s"]:.2f} s. A server started
  with `warmup = "auto"` (the default on CUDA devices) pays the difference before it takes requests:
  its warm-up runs one image of the default size, which captures the batch-1 graph of that size.
- Calls with and without graphs alternated, {data["command"].split("--rounds ")[-1]} of each per batch size;
  joules from the device's NVML counter around each call (synchronized; counter steps of about 100 ms).

{table}

{fallback}"""


if __name__ == "__main__":
    raise SystemExit(main())

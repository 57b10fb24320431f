"""Model runners behind the proxy, and the small torch helpers they share.

Importing this package is cheap: torch and the model libraries load only when a backend does.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from backends.base import Backend, Task

DTYPE_NAMES = ("float32", "float16", "bfloat16")

# One model loads in this process at a time (the model libraries' imports, and their lazy modules, are
# not for two threads at once); a model process loads its model while the next one is set up.
LOADING = threading.Lock()


class _PilFallbackNotice(logging.Filter):
    """Drops transformers' notice, on every start of an image model where torchvision is not installed
    (it is not a dependency), that an image processor falls back to its PIL implementation: what the
    processors did before transformers moved them to torchvision, with the same results."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_PilFallbackNotice())


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype called `name` (one of `DTYPE_NAMES`); `ValueError` for anything else."""
    import torch

    if name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPE_NAMES)}")
    return getattr(torch, name)


def synchronize_device(device: str) -> None:
    """Block until `device` has finished its queued work (a no-op off CUDA)."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def release_device_memory(device: str) -> None:
    """Return cached allocator blocks to the driver after a model was dropped (CUDA only)."""
    import gc

    import torch

    gc.collect()
    if torch.device(device).type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.empty_cache()


def quiet_progress_bars() -> None:
    """Turn off the libraries' tqdm bars (loading/saving shards): a server logs, it does not draw.
    A library that is not installed (diffusers, on a host that serves text only) has none to turn off."""
    import importlib

    for module, switch in (
        ("transformers.utils.logging", "disable_progress_bar"),
        ("diffusers.utils.logging", "disable_progress_bar"),
        ("huggingface_hub.utils", "disable_progress_bars"),
    ):
        try:
            library = importlib.import_module(module)
        except ImportError:
            continue
        getattr(library, switch)()


def load_backend(
    task: Task,
    name: str,
    source: str | Path,
    *,
    device: str = "cpu",
    dtype: str = "auto",
    own_process: bool = False,
    torch_threads: int | None = None,
    cuda_graphs: bool = False,
    batch_timeout_s: float | None = None,
) -> Backend:
    """Construct the backend for `task` and load it (blocking: call from a worker thread).

    `own_process`: the model runs in a child process (`backends.process`), which sets its torch
    threads to `torch_threads` (None: torch's default); this process keeps only the tokenizer.
    `cuda_graphs`: images only (`DiffusersImageBackend`). `batch_timeout_s`: a model process that runs a
    batch longer is killed (`own_process` only: a model in this process cannot be stopped)."""
    with LOADING:
        quiet_progress_bars()
        backend: Backend
        if batch_timeout_s is not None and not own_process:
            raise ValueError(f"{name}: batch_timeout_s needs own_process (a model here cannot be stopped)")
        if cuda_graphs and task != "image":
            raise ValueError(f"{name}: cuda_graphs is for image models, not {task!r}")
        if task == "text":
            from backends.text_transformers import TransformersTextBackend

            backend = TransformersTextBackend(name, source, device=device, dtype=dtype)
        elif task == "image":
            from backends.image_diffusers import DiffusersImageBackend

            backend = DiffusersImageBackend(name, source, device=device, dtype=dtype, cuda_graphs=cuda_graphs)
        else:
            raise ValueError(f"unknown task {task!r}; expected 'text' or 'image'")
        if not own_process:
            backend.load()
            return backend
        from backends.process import ProcessBackend

        load_tokenizer = getattr(backend, "load_tokenizer", None)  # the text front counts prompts
        if load_tokenizer is not None:
            load_tokenizer()
        process = ProcessBackend(
            backend,
            task=task,
            name=name,
            source=str(source),
            device=device,
            dtype=dtype,
            torch_threads=torch_threads,
            cuda_graphs=cuda_graphs,
            batch_timeout_s=batch_timeout_s,
        )
        process.start()
    process.wait_loaded()  # without the lock: models called for at once load side by side
    return process

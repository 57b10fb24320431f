"""Image generation with diffusers: one pipeline call per batch, one seeded generator per image.

A batch shares size, steps and guidance (the batch key); every member's prompt is repeated `n`
times and the whole batch is a single pipeline call. Each image has its own `torch.Generator`
seeded `seed + i`, so an image is reproducible from its returned seed alone: bit for bit at the
same batch size, and up to floating-point rounding (a pixel level or so) in another batch.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import deprecation_utils

from backends import release_device_memory, synchronize_device, torch_dtype
from backends.base import BackendRequest, BackendResult, ImageRequest, ImageResult, Task
from backends.cuda_graphs import GraphedDenoiser

SEED_RANGE = 2**32  # drawn seeds stay well inside JSON's exact integers (2**53)
# diffusers renamed `torch_dtype` to `dtype` (PR #14205); older releases know only the former.
_DTYPE_KWARG = "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


def image_work_units(request: ImageRequest) -> float:
    """Denoising work: steps x width x height x images, doubled under classifier-free guidance.

    Guidance (`guidance_scale > 1`) runs the denoiser on a conditional and an unconditional copy.
    """
    guidance = 2 if request.guidance_scale > 1 else 1
    return float(request.steps * request.width * request.height * request.n * guidance)


class DiffusersImageBackend:
    """A text-to-image `DiffusionPipeline` (safetensors, no remote code or custom pipelines).

    `dtype="auto"`: float16 on CUDA, float32 elsewhere. `cuda_graphs`: replay the denoiser's steps as
    CUDA graphs (`backends.cuda_graphs`; a CUDA device and a pipeline with a UNet only).
    """

    task: Task = "image"

    def __init__(
        self,
        name: str,
        source: str | Path,
        device: str = "cpu",
        dtype: str = "auto",
        cuda_graphs: bool = False,
    ) -> None:
        if dtype != "auto":
            torch_dtype(dtype)  # fail at construction on a bad name
        if cuda_graphs and torch.device(device).type != "cuda":
            raise ValueError(f"{name}: cuda_graphs needs a CUDA device, not {device!r}")
        self.name = name
        self.source = str(source)
        self.device = device
        self.dtype = dtype
        self.cuda_graphs = cuda_graphs
        self.graphs: GraphedDenoiser | None = None  # where cuda_graphs, once loaded
        self._lock = threading.Lock()  # one pipeline call at a time: a pipeline holds per-call state
        self._pipe: Any = None
        self._scheduler_config: Any = None

    def load(self) -> None:
        """Load the pipeline onto `device` (blocking)."""
        if self.dtype != "auto":
            dtype = torch_dtype(self.dtype)
        else:
            dtype = torch.float16 if torch.device(self.device).type == "cuda" else torch.float32
        pipe = DiffusionPipeline.from_pretrained(self.source, use_safetensors=True, **{_DTYPE_KWARG: dtype})
        pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        graphs = None
        if self.cuda_graphs:
            unet = getattr(pipe, "unet", None)
            if unet is None:
                raise ValueError(
                    f"{self.name}: cuda_graphs needs a pipeline with a UNet, not {type(pipe).__name__}"
                )
            graphs = GraphedDenoiser(unet)
        with self._lock:
            self._pipe = pipe
            self.graphs = graphs
            self._scheduler_config = pipe.scheduler.config

    @property
    def default_size(self) -> tuple[int, int]:
        """(width, height) in pixels the model was trained at: its latent size x the VAE's factor."""
        pipe = self._loaded()
        sample = getattr(pipe, "default_sample_size", None) or pipe.unet.config.sample_size
        height, width = (sample, sample) if isinstance(sample, int) else sample
        factor = pipe.vae_scale_factor
        return width * factor, height * factor

    def batch_key(self, request: BackendRequest) -> Hashable:
        """Images batch together when size, steps and guidance match."""
        if not isinstance(request, ImageRequest):
            raise TypeError(f"{self.name} serves image requests, not {type(request).__name__}")
        return (request.width, request.height, request.steps, request.guidance_scale)

    def run(self, batch: Sequence[BackendRequest]) -> list[BackendResult]:
        """Generate every member's images in one pipeline call; results in batch order."""
        requests = self._check_batch(batch)
        seeds = [self._seeds(request) for request in requests]
        prompts = [request.prompt for request in requests for _ in range(request.n)]
        negatives = [request.negative_prompt or "" for request in requests for _ in range(request.n)]
        first = requests[0]
        with self._lock, torch.inference_mode():
            pipe = self._loaded()
            # A scheduler keeps state from its last run (step index, timesteps): start each call fresh
            # (diffusers issues #1606, #7851).
            pipe.scheduler = type(pipe.scheduler).from_config(self._scheduler_config)
            generators = [
                # an unsigned 64-bit number (a request's seed is int64, then + i)
                torch.Generator(device=self.device).manual_seed(seed % 2**64)
                for member in seeds
                for seed in member
            ]
            output = pipe(
                prompt=prompts,
                negative_prompt=negatives if any(negatives) else None,
                width=first.width,
                height=first.height,
                num_inference_steps=first.steps,
                guidance_scale=first.guidance_scale,
                num_images_per_prompt=1,
                generator=generators,
                output_type="pil",
            )
        images = iter(output.images)
        return [  # decoded: the server makes the PNGs off the device's thread (ImageResult.encoded)
            ImageResult(
                images_png=(),
                seeds=member_seeds,
                work_units=image_work_units(request),
                images=tuple(next(images) for _ in member_seeds),
            )
            for request, member_seeds in zip(requests, seeds, strict=True)
        ]

    def synchronize(self) -> None:
        """Wait for the device's queued work (CUDA); nothing to wait for on CPU."""
        synchronize_device(self.device)

    def close(self) -> None:
        """Drop the pipeline and return its device memory."""
        with self._lock:
            if self.graphs is not None:
                self.graphs.remove()
            self._pipe = None
            self.graphs = None
        release_device_memory(self.device)

    def _loaded(self) -> Any:
        if self._pipe is None:
            raise RuntimeError(f"backend {self.name!r} is not loaded")
        return self._pipe

    def _check_batch(self, batch: Sequence[BackendRequest]) -> list[ImageRequest]:
        if not batch:
            raise ValueError("empty batch")
        keys = {self.batch_key(request) for request in batch}
        if len(keys) > 1:
            raise ValueError(f"a batch must share one batch key, got {sorted(map(str, keys))}")
        requests = [request for request in batch if isinstance(request, ImageRequest)]
        for request in requests:
            if request.n < 1 or request.steps < 1:
                raise ValueError(f"n and steps must be at least 1, got n={request.n}, steps={request.steps}")
        return requests

    @staticmethod
    def _seeds(request: ImageRequest) -> tuple[int, ...]:
        """`seed + i` for image i; a drawn seed when the request has none (and it is reported)."""
        base = request.seed if request.seed is not None else secrets.randbelow(SEED_RANGE)
        return tuple(base + i for i in range(request.n))

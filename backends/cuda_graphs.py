"""CUDA graphs for a diffusion pipeline's denoiser: each step's forward pass replayed as one graph.

A full-size UNet step is about a thousand small kernels, which eager PyTorch launches one by one from
the calling thread. At batch 1 on a fast GPU the host's launching is then the bottleneck: the device
waits for the thread, and the thread's speed (and anything else that wants the interpreter lock or the
core) sets the call's duration. A CUDA graph records the step's kernels once per input shape and
replays them with a single launch: the same kernels on the same inputs, so the same numbers.

`GraphedDenoiser(module)` wraps the module's `forward` in place (the pipeline keeps calling
`pipe.unet(...)` and reading its config). A call is replayed when its inputs are tensors: the sample,
the timestep and the text embeddings, and where set the timestep condition, class labels, attention
masks and SDXL's added conditions (`added_cond_kwargs`, a dict of tensors), with `return_dict=False`,
under no autograd. A call with anything else (ControlNet residuals, `cross_attention_kwargs` such as a
LoRA scale) runs eagerly. The first call of each input shape runs twice eagerly (to let the libraries
choose their kernels and allocate their workspaces outside the capture) and is then captured; the last
`max_graphs` shapes are kept, each with its own inputs, output and memory pool. A shape whose capture
fails (an operation a graph cannot hold) is logged and runs eagerly from then on.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

import torch

log = logging.getLogger(__name__)

MAX_GRAPHS = 4  # input shapes kept captured (size x batch); each holds its activations' memory
WARMUP_RUNS = 2  # eager runs on the capture stream before a capture
# Keyword arguments of `UNet2DConditionModel.forward` whose tensors (or dict of tensors) become inputs
# of the graph, copied in at each replay
_TENSOR_INPUTS = (
    "timestep_cond",
    "class_labels",
    "attention_mask",
    "encoder_attention_mask",
    "added_cond_kwargs",
)
# ... and those a replayed call must leave unset (None, or empty): they change the computation itself
_UNSET = (
    "cross_attention_kwargs",
    "down_block_additional_residuals",
    "mid_block_additional_residual",
    "down_intrablock_additional_residuals",
)


class _Graph:
    """One captured forward pass: static inputs copied into, one replay, the static output cloned."""

    def __init__(self, eager: Any, stream: torch.cuda.Stream, inputs: dict[str, Any]) -> None:
        device = inputs["sample"].device
        current = torch.cuda.current_stream(device)
        self.inputs = {name: tensor.to(device).clone() for name, tensor in inputs.items()}
        kwargs = as_kwargs(self.inputs)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):  # warm-up and capture on one stream (library handles per stream)
            for _ in range(WARMUP_RUNS):
                eager(**kwargs, return_dict=False)
        self.graph = torch.cuda.CUDAGraph()
        # Not `torch.cuda.graph(...)`: where the capture fails, its exit raises before it restores the
        # current stream, and this thread's later work would all run on the capture stream. Here the
        # stream context always ends, and a failed capture is ended and its memory pool let go.
        pool = torch.cuda.graph_pool_handle()
        torch.cuda.synchronize(device)  # as `torch.cuda.graph` does: nothing of the warm-up pending
        with torch.cuda.stream(stream):
            # thread_local: another thread of the process may use the device meanwhile (another model)
            self.graph.capture_begin(pool=pool, capture_error_mode="thread_local")
            try:
                self.output = eager(**kwargs, return_dict=False)[0]
            except BaseException:
                _abandon(self.graph, device, pool)
                raise
            self.graph.capture_end()
        current.wait_stream(stream)

    def replay(self, inputs: dict[str, Any]) -> Any:
        for name, tensor in inputs.items():
            self.inputs[name].copy_(tensor)
        self.graph.replay()
        return self.output.clone()  # the next replay overwrites the static output


def _abandon(graph: torch.cuda.CUDAGraph, device: torch.device, pool: Any) -> None:
    """End a capture whose forward pass failed. Where the failure invalidated the capture (an operation
    a graph cannot hold), ending it raises before PyTorch's allocator stops routing the capture's
    allocations to its pool; while it routes, the allocator defers freeing blocks used on several
    streams. The pool is then let go here (PyTorch's private calls, where this version has them)."""
    try:
        graph.capture_end()
        return  # ended cleanly: the graph gives its pool back when it is dropped
    except Exception:
        pass
    index = device.index if device.index is not None else torch.cuda.current_device()
    for name in ("_cuda_endAllocateToPool", "_cuda_releasePool"):
        call = getattr(torch._C, name, None)
        if call is None:
            return
        try:
            call(index, pool)
        except Exception:  # this version's allocator had let go of it already
            log.debug("%s after a failed capture", name, exc_info=True)


class GraphedDenoiser:
    """Replays `module`'s forward passes as CUDA graphs, one per input shape (module docstring)."""

    def __init__(self, module: Any, max_graphs: int = MAX_GRAPHS) -> None:
        device = next(module.parameters()).device
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need the denoiser on a CUDA device, not {device}")
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be at least 1, got {max_graphs}")
        self.module = module
        self.eager = module.forward
        self.enabled = True  # False: every call runs eagerly (the captured graphs are kept)
        self.max_graphs = max_graphs
        self.captures = 0  # graphs captured so far (evicted ones included)
        self._stream = torch.cuda.Stream(device=device)
        self._graphs: OrderedDict[Hashable, _Graph] = OrderedDict()
        self._uncapturable: set[Hashable] = set()  # shapes whose capture failed: eager
        module.forward = self.forward  # an instance attribute: nn.Module.__call__ finds it first

    def forward(
        self, sample: Any, timestep: Any, encoder_hidden_states: Any = None, *args: Any, **kwargs: Any
    ):
        inputs = call_inputs(sample, timestep, encoder_hidden_states, args, kwargs) if self.enabled else None
        if inputs is None or sample.device.type != "cuda":
            return self.eager(sample, timestep, encoder_hidden_states, *args, **kwargs)
        key = _key(inputs)
        graph = self._graphs.get(key)
        if graph is None:
            if key in self._uncapturable:
                return self.eager(sample, timestep, encoder_hidden_states, *args, **kwargs)
            try:
                graph = _Graph(self.eager, self._stream, inputs)
            except Exception:  # an operation that cannot be captured: this shape runs eagerly from now on
                log.exception(
                    "a CUDA graph of the denoiser for %s could not be captured: it runs eagerly", key
                )
                self._uncapturable.add(key)
                return self.eager(sample, timestep, encoder_hidden_states, *args, **kwargs)
            self.captures += 1
            self._graphs[key] = graph
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
        return (graph.replay(inputs),)

    @property
    def shapes(self) -> int:
        """Input shapes captured now."""
        return len(self._graphs)

    def remove(self) -> None:
        """Drop the graphs (their memory goes back to PyTorch's allocator) and give the module its own
        forward back."""
        self._graphs.clear()
        if self.module.__dict__.get("forward") == self.forward:
            del self.module.forward


def call_inputs(sample: Any, timestep: Any, text: Any, args: tuple, kwargs: dict) -> dict[str, Any] | None:
    """A denoiser call's inputs by name (`sample`, `timestep`, `encoder_hidden_states`, then each set
    tensor keyword, a dict's entries as `added_cond_kwargs.time_ids`), or None where the call must run
    eagerly: positional extras, `return_dict` not False, a keyword left unset above set or unknown, a
    value that is not a tensor, an input on another device than the sample, autograd on."""
    if args or kwargs.get("return_dict", True) is not False or torch.is_grad_enabled():
        return None
    if not (torch.is_tensor(sample) and torch.is_tensor(timestep) and torch.is_tensor(text)):
        return None
    if timestep.numel() not in (1, sample.shape[0]):
        return None
    inputs = {"sample": sample, "timestep": timestep, "encoder_hidden_states": text}
    for name, value in kwargs.items():
        if name == "return_dict" or value is None or (isinstance(value, dict) and not value):
            continue
        if name not in _TENSOR_INPUTS:
            return None  # one of _UNSET set, or a keyword this module does not know
        if torch.is_tensor(value):
            inputs[name] = value
        elif isinstance(value, dict) and all(
            isinstance(k, str) and torch.is_tensor(v) for k, v in value.items()
        ):
            inputs.update((f"{name}.{k}", v) for k, v in value.items())
        else:
            return None
    if any(t.device != sample.device for name, t in inputs.items() if name != "timestep"):
        return None
    return inputs


def replay_key(sample: Any, timestep: Any, text: Any, args: tuple, kwargs: dict) -> Hashable | None:
    """The graph a denoiser call would replay (its inputs' names, devices, shapes and dtypes), or None
    where it runs eagerly (`call_inputs`)."""
    inputs = call_inputs(sample, timestep, text, args, kwargs)
    return None if inputs is None else _key(inputs)


def _key(inputs: dict[str, Any]) -> Hashable:
    return tuple(
        (name, str(inputs[name].device), tuple(inputs[name].shape), inputs[name].dtype)
        for name in sorted(inputs)
    )


def as_kwargs(inputs: dict[str, Any]) -> dict[str, Any]:
    """`call_inputs`'s flat names back into the forward's keyword arguments."""
    kwargs: dict[str, Any] = {}
    for name, tensor in inputs.items():
        outer, _, inner = name.partition(".")
        if inner:
            kwargs.setdefault(outer, {})[inner] = tensor
        else:
            kwargs[outer] = tensor
    return kwargs

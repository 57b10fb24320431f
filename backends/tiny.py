"""Random-weight models of real architectures, built locally (no downloads).

Each preset instantiates the real classes (GPT-2, Stable Diffusion 1.5 / 2.1 / XL) from a config,
seeds their weights, trains a byte-level BPE tokenizer on a corpus embedded below, and saves the
whole thing with `save_pretrained` (safetensors). The proxy then loads it back through the same
`from_pretrained` path it uses for real checkpoints, so the embedded default, the tests and the GPU
benchmarks at real sizes all exercise the production code.

The `tiny-*` presets are small enough for a CPU (milliseconds per image or token). The full-size ones
(`sd15`, `sd21`, `sdxl`, `gpt2-medium`) have the real configs and therefore the real compute per
step, for energy benchmarks where the real weights cannot be downloaded; their output is noise.

    python -m backends.tiny build tiny-sd --out ~/.cache/wattproxy/models
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from backends import torch_dtype
from backends.base import Task

# Bump when a builder changes what it writes: the version is part of the cache directory's name, so
# a stale build is never picked up.
BUILD_VERSION = 1
SEED = 1234
MANIFEST = "wattproxy_tiny.json"
# Seeding and drawing weights use torch's process-wide RNG: two builds at once would interleave.
_BUILD_LOCK = threading.RLock()
END_OF_TEXT = "<|endoftext|>"
START_OF_TEXT = "<|startoftext|>"

# The tokenizers' training text. Any English prose would do; this one is about the project's subject,
# with digits, punctuation and a few multi-byte characters so byte-level merges see them.
_CORPUS = """\
WattProxy measures the energy that each inference request really draws from the GPU.
The proxy reads the energy counter before and after every batch, and splits the joules across
the requests in the batch in proportion to the work that each one caused.
Image generation with a diffusion model runs a denoising network for a number of steps.
Each step costs roughly the same energy, so the work of an image is steps times pixels.
Classifier-free guidance runs the network twice per step: once with the prompt, once without.
Text generation runs a transformer once over the prompt, then once for every new token.
A language model predicts the next token from the tokens before it, one at a time.
The energy of a kilowatt hour is 3.6 million joules; a smartphone charge is about 0.012 kWh.
Carbon intensity is measured in grams of CO2 equivalent per kilowatt hour of electricity.
In France the grid emits about 56 grams per kWh, in Germany about 381, in Poland about 662.
The power usage effectiveness of a data centre multiplies the energy drawn by the servers.
A photograph of a red fox sitting in the snow, detailed, soft morning light, 35 mm lens.
An oil painting of a lighthouse on a rocky coast at sunset, with waves crashing below.
A watercolour sketch of a small café in Paris, with chairs on the pavement and a blue door.
A cat sleeping on a stack of old books next to a window, warm colours, high resolution.
Once upon a time there was a small robot who wanted to learn how to paint the sea.
Every morning it rolled down to the harbour and watched the boats come and go.
The fishermen laughed at first, but soon they brought it brushes, paper and old paint.
By the end of the summer the robot had painted one hundred pictures of the water.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 16 32 64 128 256 512 1024 2048 4096 and 3.14159.
Questions and answers: What is the capital of France? Paris. What is two plus two? Four.
def energy_per_request(joules, work, total_work): return joules * work / total_work
The meter counts millijoules since the driver was loaded; its value moves in steps.
Über den Wolken muss die Freiheit wohl grenzenlos sein. El niño comió una manzana.
Le cœur a ses raisons que la raison ne connaît point. Smörgåsbord, naïve, façade, € 12,50.
Users send prompts, the scheduler groups compatible requests, and a worker runs the batch.
The ledger records every request before the response is sent, so nothing is lost.
Operators watch the dashboards: power in watts, energy in kilowatt hours, emissions in grams.
"""


@dataclass(frozen=True)
class Preset:
    """One buildable model: its task, what it stands for, and how to make its components."""

    task: Task
    description: str
    full_size: bool  # real-size architecture: too big for the test suite's CPU
    components: Callable[[], dict[str, Any]]  # random-weight components, on the current default device


def _corpus_lines() -> list[str]:
    return _CORPUS.splitlines()


# --- tokenizers -------------------------------------------------------------------------------------
# The merges are learnt here rather than by `tokenizers`' trainer, whose tie-breaking between pairs
# of equal count varies from run to run: a preset must build byte-for-byte the same every time.

# CLIP's pre-tokenizer split (without its special-token alternatives, which the corpus lacks).
_CLIP_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _learn_merges(words: Counter[tuple[str, ...]], num_merges: int) -> list[tuple[str, str]]:
    """Byte-pair merges, most frequent pair first; ties go to the smallest pair (deterministic)."""
    splits = {word: list(word) for word in words if len(word) > 1}
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, symbols in splits.items():
            for pair in itertools.pairwise(symbols):
                pairs[pair] += words[word]
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        for word, symbols in list(splits.items()):
            merged: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            if len(merged) > 1:
                splits[word] = merged
            else:  # a whole word is one symbol: it has no pairs left to count
                del splits[word]
    return merges


def _vocab(symbols: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for symbol in symbols:
        vocab.setdefault(symbol, len(vocab))
    return vocab


def _gpt2_tokenizer(vocab_size: int = 1024, model_max_length: int = 512) -> Any:
    """GPT-2's byte-level BPE, trained on the embedded corpus; `<|endoftext|>` is the last id.

    Up to `vocab_size` ids: the 256 byte symbols, the merges the corpus supports, end-of-text.
    """
    from tokenizers import pre_tokenizers
    from transformers import GPT2Tokenizer

    split = pre_tokenizers.ByteLevel(add_prefix_space=False)
    words = Counter(tuple(piece) for line in _corpus_lines() for piece, _ in split.pre_tokenize_str(line))
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = _learn_merges(words, vocab_size - len(alphabet) - 1)
    vocab = _vocab([*alphabet, *("".join(m) for m in merges), END_OF_TEXT])
    return GPT2Tokenizer(
        vocab=vocab,
        merges=merges,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        unk_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        model_max_length=model_max_length,
    )


def _clip_tokenizer(vocab_size: int = 1200, pad_token: str = END_OF_TEXT) -> Any:
    """A CLIP tokenizer whose vocabulary is laid out like CLIP's own.

    The 256 byte-level symbols, each again with the `</w>` end-of-word suffix, the merges learnt on
    the embedded corpus (lower-cased, split as CLIP splits), then `<|startoftext|>` and
    `<|endoftext|>` last, so end-of-text has the largest id as in CLIP.
    """
    from tokenizers import Regex, pre_tokenizers
    from transformers import CLIPTokenizer

    split = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    words = Counter(
        (*piece[:-1], piece[-1] + "</w>")
        for line in _corpus_lines()
        for piece, _ in split.pre_tokenize_str(" ".join(line.lower().split()))
    )
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = _learn_merges(words, vocab_size - 2 * len(alphabet) - 2)
    ends = [a + "</w>" for a in alphabet]
    vocab = _vocab([*alphabet, *ends, *("".join(m) for m in merges), START_OF_TEXT, END_OF_TEXT])
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=77)


# --- text -------------------------------------------------------------------------------------------


def _gpt2(n_layer: int, n_embd: int, n_head: int, n_positions: int, vocab_size: int | None) -> dict[str, Any]:
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = _gpt2_tokenizer(model_max_length=n_positions)
    eos = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=vocab_size or len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    torch.manual_seed(SEED)
    return {"model": GPT2LMHeadModel(config), "tokenizer": tokenizer}


# --- images -----------------------------------------------------------------------------------------

_SD_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "set_alpha_to_one": False,
    "steps_offset": 1,
}
_SD_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
}
_SD_UNET = {
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "norm_num_groups": 32,
}
# CLIP ViT-L/14's text tower: SD 1.x's encoder and SDXL's first one.
_CLIP_VIT_L = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}


def _text_encoder(tokenizer: Any, config: dict[str, Any], *, with_projection: bool = False, seed: int) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    text_config = CLIPTextConfig(
        **{"vocab_size": len(tokenizer), **config},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(text_config) if with_projection else CLIPTextModel(text_config)


def _scheduler(name: str, config: dict[str, Any]) -> Any:
    import diffusers

    # Schedulers hold CPU tensors whatever the default device (they cannot live on `meta`).
    with torch.device("cpu"):
        return getattr(diffusers, name)(**config)


def _unet(config: dict[str, Any], *, seed: int) -> Any:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**config)


def _vae(config: dict[str, Any], *, seed: int) -> Any:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**config)


def _sd(
    *,
    unet: dict[str, Any],
    vae: dict[str, Any],
    text: dict[str, Any],
    scheduler: str,
    scheduler_config: dict[str, Any],
    pad_token: str = END_OF_TEXT,
) -> dict[str, Any]:
    """Components of a `StableDiffusionPipeline` (one CLIP text encoder)."""
    tokenizer = _clip_tokenizer(pad_token=pad_token)
    return {
        "tokenizer": tokenizer,
        "text_encoder": _text_encoder(tokenizer, text, seed=SEED),
        "unet": _unet(unet, seed=SEED + 1),
        "vae": _vae(vae, seed=SEED + 2),
        "scheduler": _scheduler(scheduler, scheduler_config),
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }


def _sdxl(*, unet: dict[str, Any], vae: dict[str, Any], text: dict[str, Any], text_2: dict[str, Any]) -> dict:
    """Components of a `StableDiffusionXLPipeline` (two CLIP text encoders, the second projected)."""
    tokenizer = _clip_tokenizer()
    tokenizer_2 = _clip_tokenizer(pad_token="!")
    return {
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "text_encoder": _text_encoder(tokenizer, text, seed=SEED),
        "text_encoder_2": _text_encoder(tokenizer_2, text_2, with_projection=True, seed=SEED + 3),
        "unet": _unet(unet, seed=SEED + 1),
        "vae": _vae(vae, seed=SEED + 2),
        "scheduler": _scheduler(
            "EulerDiscreteScheduler",
            {
                **{k: v for k, v in _SD_SCHEDULER.items() if k != "set_alpha_to_one"},
                "interpolation_type": "linear",
                "timestep_spacing": "leading",
            },
        ),
        "force_zeros_for_empty_prompt": True,
        "add_watermarker": False,
    }


def _tiny_sd() -> dict[str, Any]:
    return _sd(
        unet={
            "sample_size": 8,  # x the VAE's factor 8: 64x64 by default
            "in_channels": 4,
            "out_channels": 4,
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "block_out_channels": (32, 64),
            "layers_per_block": 1,
            "cross_attention_dim": 32,
            "attention_head_dim": 8,
            "norm_num_groups": 32,
        },
        vae={
            **_SD_VAE,
            "block_out_channels": (16, 32, 32, 32),  # four blocks: SD's 8x spatial compression
            "layers_per_block": 1,
            "norm_num_groups": 16,
            "sample_size": 64,
        },
        text={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "max_position_embeddings": 77,
            "projection_dim": 32,
        },
        scheduler="PNDMScheduler",
        scheduler_config={**_SD_SCHEDULER, "skip_prk_steps": True},
    )


def _tiny_sdxl() -> dict[str, Any]:
    text = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "max_position_embeddings": 77,
        "projection_dim": 32,
        "hidden_act": "gelu",
    }
    return _sdxl(
        unet={
            "sample_size": 8,
            "in_channels": 4,
            "out_channels": 4,
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
            "block_out_channels": (32, 64),
            "layers_per_block": 1,
            "attention_head_dim": (2, 4),
            "transformer_layers_per_block": (1, 2),
            "cross_attention_dim": 64,  # both encoders' hidden states side by side: 32 + 32
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 8 * 6 + 32,  # six size/crop ids + pooled text
            "norm_num_groups": 32,
        },
        vae={
            **_SD_VAE,
            "block_out_channels": (16, 32, 32, 32),
            "layers_per_block": 1,
            "norm_num_groups": 16,
            "sample_size": 64,
            "force_upcast": True,
        },
        text=text,
        text_2=text,
    )


def _sd15() -> dict[str, Any]:
    return _sd(
        unet={**_SD_UNET, "sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8},
        vae={**_SD_VAE, "sample_size": 512},
        text=_CLIP_VIT_L,
        scheduler="PNDMScheduler",
        scheduler_config={**_SD_SCHEDULER, "skip_prk_steps": True},
    )


def _sd21() -> dict[str, Any]:
    return _sd(
        unet={
            **_SD_UNET,
            "sample_size": 96,
            "cross_attention_dim": 1024,
            "attention_head_dim": (5, 10, 20, 20),
            "use_linear_projection": True,
            "upcast_attention": True,
        },
        vae={**_SD_VAE, "sample_size": 768},
        # OpenCLIP ViT-H/14's text tower without its last layer (SD 2 conditions on the penultimate).
        text={
            "vocab_size": 49408,
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_attention_heads": 16,
            "num_hidden_layers": 23,
            "max_position_embeddings": 77,
            "hidden_act": "gelu",
            "projection_dim": 512,
        },
        scheduler="DDIMScheduler",
        scheduler_config={**_SD_SCHEDULER, "clip_sample": False, "prediction_type": "v_prediction"},
        pad_token="!",
    )


def _sdxl_base() -> dict[str, Any]:
    return _sdxl(
        unet={
            "sample_size": 128,
            "in_channels": 4,
            "out_channels": 4,
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "block_out_channels": (320, 640, 1280),
            "layers_per_block": 2,
            "attention_head_dim": (5, 10, 20),
            "transformer_layers_per_block": (1, 2, 10),
            "cross_attention_dim": 2048,
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816,
            "norm_num_groups": 32,
        },
        vae={**_SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
        text=_CLIP_VIT_L,
        # OpenCLIP ViT-bigG/14's text tower.
        text_2={
            "vocab_size": 49408,
            "hidden_size": 1280,
            "intermediate_size": 5120,
            "num_attention_heads": 20,
            "num_hidden_layers": 32,
            "max_position_embeddings": 77,
            "hidden_act": "gelu",
            "projection_dim": 1280,
        },
    )


PRESETS: dict[str, Preset] = {
    "tiny-gpt2": Preset(
        "text",
        "GPT-2, 2 layers x 64 wide, 512 positions, 1024-token BPE trained locally",
        False,
        lambda: _gpt2(n_layer=2, n_embd=64, n_head=2, n_positions=512, vocab_size=None),
    ),
    "tiny-sd": Preset("image", "Stable Diffusion layout, tiny UNet/VAE/CLIP, 64x64 default", False, _tiny_sd),
    "tiny-sdxl": Preset("image", "SDXL layout (two text encoders), tiny, 64x64 default", False, _tiny_sdxl),
    "gpt2-medium": Preset(
        "text",
        "GPT-2 medium: 24 layers x 1024, 16 heads, vocab 50257 (tokenizer: the tiny one)",
        True,
        lambda: _gpt2(n_layer=24, n_embd=1024, n_head=16, n_positions=1024, vocab_size=50257),
    ),
    "sd15": Preset("image", "Stable Diffusion 1.5: UNet 860M, CLIP ViT-L/14 text, 512x512", True, _sd15),
    "sd21": Preset("image", "Stable Diffusion 2.1: v-prediction, OpenCLIP-H text, 768x768", True, _sd21),
    "sdxl": Preset("image", "SDXL base: UNet 2.6B, CLIP-L + OpenCLIP-bigG text, 1024x1024", True, _sdxl_base),
}


def _preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None


def build_components(preset: str, *, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Instantiate a preset's components with seeded random weights.

    On `device="meta"` the modules have shapes but no storage: a cheap check of full-size configs.
    The caller's torch RNG state is left as it was. Weights come from torch's process-wide RNG, so
    builds in one process take turns; a thread sampling from that RNG meanwhile would still perturb
    a build, so build before serving.
    """
    spec = _preset(preset)
    with _BUILD_LOCK, torch.random.fork_rng(devices=[]), torch.device(device):
        return spec.components()


def _save(preset: str, components: dict[str, Any], out: Path, dtype: torch.dtype) -> None:
    if PRESETS[preset].task == "text":
        components["model"].to(dtype).save_pretrained(out)  # safetensors: transformers' only format
        components["tokenizer"].save_pretrained(out)
        return
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    pipeline_cls = StableDiffusionXLPipeline if "text_encoder_2" in components else StableDiffusionPipeline
    pipeline = pipeline_cls(**components)
    if dtype != torch.float32:
        pipeline.to(dtype=dtype)
    pipeline.save_pretrained(out, safe_serialization=True)


def model_dir(preset: str, cache_dir: Path, *, dtype: str = "float32") -> Path:
    """Where `ensure_model` keeps a preset: named by preset, dtype and builder version."""
    return Path(cache_dir) / f"{preset}-{dtype}-v{BUILD_VERSION}"


def ensure_model(preset: str, cache_dir: Path, *, dtype: str = "float32") -> Path:
    """Build `preset` into `cache_dir` unless it is already there; return the model's directory.

    The directory loads with `from_pretrained` (AutoModelForCausalLM + AutoTokenizer for text
    presets, DiffusionPipeline for image presets). Builds are deterministic (fixed seeds) and atomic:
    they are written to a temporary sibling and renamed into place, so a reader never sees a partial
    model. In one process a model is built once; of two processes building it at once, the one that
    renames second discards its copy.
    """
    target = model_dir(preset, cache_dir, dtype=dtype)
    if target.is_dir():
        return target
    from backends import quiet_progress_bars

    quiet_progress_bars()
    _preset(preset)  # validate both names before any work
    weights_dtype = torch_dtype(dtype)
    with _BUILD_LOCK:
        if target.is_dir():  # another thread of this process built it meanwhile
            return target
        _build(preset, target, dtype, weights_dtype)
    return target


def _build(preset: str, target: Path, dtype: str, weights_dtype: torch.dtype) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _save(preset, build_components(preset), staging, weights_dtype)
        manifest = {
            "preset": preset,
            "task": PRESETS[preset].task,
            "dtype": dtype,
            "build_version": BUILD_VERSION,
            "seed": SEED,
            "build_seconds": round(time.perf_counter() - started, 3),
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        staging.chmod(0o755)  # mkdtemp's 0700 is for the build, not for the readers
        try:
            os.rename(staging, target)
        except OSError:
            if not target.is_dir():  # not a lost race with another process: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m backends.tiny build PRESET --out DIR` prints the built model's directory."""
    parser = argparse.ArgumentParser(prog="python -m backends.tiny", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build a preset (once) and print its directory")
    build.add_argument("preset", choices=sorted(PRESETS))
    build.add_argument("--out", type=Path, required=True, help="cache directory to build into")
    build.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    commands.add_parser("list", help="list the presets")
    args = parser.parse_args(argv)
    if args.command == "list":
        for name, spec in PRESETS.items():
            sys.stdout.write(f"{name:12} {spec.task:6} {spec.description}\n")
        return 0
    sys.stdout.write(f"{ensure_model(args.preset, args.out, dtype=args.dtype)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

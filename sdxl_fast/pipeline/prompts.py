"""Prompt text -> SDXL text embeddings from both CLIP encoders."""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from ..models import TextEncoders


PROMPT_CACHE_SIZE = 64  # SDXL: 64 x 315 KB of fp16 embeddings


class PromptTruncatedWarning(UserWarning):
    """The prompt is longer than the 77 tokens the CLIP encoders read; the rest is ignored."""


@dataclass
class PromptEmbeddings:
    """hidden_1: [B, 77, D1] (None without a first encoder), hidden_2: [B, 77, D2], pooled: [B, P2].

    The base UNet reads cat(hidden_1, hidden_2) as cross-attention context; the refiner reads hidden_2 only.
    Both read `pooled` (the second encoder's projected end-of-text token) in their added embedding.
    """

    hidden_1: torch.Tensor | None
    hidden_2: torch.Tensor
    pooled: torch.Tensor

    @property
    def base_context(self) -> torch.Tensor:
        return torch.cat([self.hidden_1, self.hidden_2], dim=-1)

    def clone(self) -> "PromptEmbeddings":
        return PromptEmbeddings(None if self.hidden_1 is None else self.hidden_1.clone(), self.hidden_2.clone(),
                                self.pooled.clone())

    def zeros_like(self) -> "PromptEmbeddings":
        return PromptEmbeddings(
            None if self.hidden_1 is None else torch.zeros_like(self.hidden_1),
            torch.zeros_like(self.hidden_2), torch.zeros_like(self.pooled),
        )


def _tokenize(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, str | None]:
    """Token ids [B, 77] on the CPU, and a warning text when a prompt was cut to fit.

    One tokenizer call, padded and cut here as the tokenizer's own `padding="max_length", truncation=True`
    would (the start token, the first 75 tokens, the end token): asking the tokenizer for both the padded ids
    and the untruncated length takes two calls, a tenth of a millisecond each, before any GPU work can start.
    """
    max_len = tokenizer.model_max_length
    rows, warning = [], None
    for prompt, ids in zip(prompts, tokenizer(prompts).input_ids):
        if len(ids) > max_len:
            warning = warning or (f"Prompt has {len(ids)} tokens; the text encoders read {max_len}, so only the "
                                  f"start is used: {tokenizer.decode(ids[1:max_len - 1])[:80]!r}...")
            ids = ids[:max_len - 1] + ids[-1:]  # keep the end token
        rows.append(ids + [tokenizer.pad_token_id] * (max_len - len(ids)))
    return torch.tensor(rows), warning


def _to(ids: torch.Tensor | None, device) -> torch.Tensor | None:
    return None if ids is None else ids.to(device)


def tokenize(encoders: TextEncoders, prompts: list[str]) -> tuple[torch.Tensor | None, torch.Tensor, str | None]:
    """Prompts -> (ids for the first encoder or None, ids for the second, [B, 77] each on the CPU, and a
    warning text when a prompt is longer than the encoders read)."""
    ids_1 = None
    if encoders.text_encoder is not None:
        ids_1, _ = _tokenize(encoders.tokenizer, prompts)
    ids_2, truncated = _tokenize(encoders.tokenizer_2, prompts)
    return ids_1, ids_2, truncated


_streams = threading.local()


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """A side stream per thread and device: a stream shared with another thread could be pulled into a CUDA
    graph that thread is recording."""
    streams = _streams.__dict__.setdefault("by_device", {})
    if device not in streams:
        streams[device] = torch.cuda.Stream(device)
    return streams[device]


@torch.no_grad()
def encode_tokens(encoders: TextEncoders, ids_1: torch.Tensor | None, ids_2: torch.Tensor) -> PromptEmbeddings:
    """Token ids on the encoders' device -> embeddings. SDXL uses each encoder's penultimate hidden state.
    Pure tensor work with no host synchronisation, so it can be recorded in a CUDA graph.

    On a GPU the first encoder runs on a side stream, beside the second: at batch 1 each is a chain of small
    kernels that leaves most of the GPU idle (3.3 ms for 0.11 TFLOP one after the other on an H200, graphed).
    """
    hidden_1, side = None, None
    if encoders.text_encoder is not None:
        if ids_1.is_cuda:
            main, side = torch.cuda.current_stream(ids_1.device), _side_stream(ids_1.device)
            side.wait_stream(main)  # ids_1 was written on the main stream
        with torch.cuda.stream(side):  # a no-op for None
            hidden_1 = encoders.text_encoder(ids_1, output_hidden_states=True).hidden_states[-2]
    out_2 = encoders.text_encoder_2(ids_2, output_hidden_states=True)
    if side is not None:
        main.wait_stream(side)
        hidden_1.record_stream(main)  # made on the side stream, used on the main one: not reused too early
    return PromptEmbeddings(hidden_1=hidden_1, hidden_2=out_2.hidden_states[-2], pooled=out_2.text_embeds)


def encode_prompts(encoders: TextEncoders, prompts: list[str], device: torch.device) -> PromptEmbeddings:
    """Encode a batch of prompts; warns with PromptTruncatedWarning when one is cut to fit."""
    ids_1, ids_2, truncated = tokenize(encoders, prompts)
    if truncated:
        warnings.warn(truncated, PromptTruncatedWarning, stacklevel=2)
    return encode_tokens(encoders, _to(ids_1, device), ids_2.to(device))


def encode_prompt_cached(encoders: TextEncoders, prompt: str, device: torch.device,
                         encode: Callable | None = None) -> PromptEmbeddings:
    """`encode_prompts` for one prompt, remembering the last PROMPT_CACHE_SIZE prompts per encoder pair.

    Exact (the same tensors come back), and it takes the text encoders off the critical path when a prompt
    repeats: a re-run with a new seed, the negative prompt of every Quality call, live typing that returns
    to an earlier text. `encode(ids_1, ids_2)` runs on a miss (default: `encode_tokens` on `encoders`); it
    must return tensors that it does not overwrite later.
    """
    cache, key = encoders.cache, (str(device), prompt)
    if key not in cache:
        ids_1, ids_2, truncated = tokenize(encoders, [prompt])
        encode = encode or partial(encode_tokens, encoders)
        cache[key] = (encode(_to(ids_1, device), ids_2.to(device)), truncated)
        while len(cache) > PROMPT_CACHE_SIZE:
            cache.popitem(last=False)
    cache.move_to_end(key)
    embeddings, truncated = cache[key]
    if truncated:
        warnings.warn(truncated, PromptTruncatedWarning, stacklevel=2)
    return embeddings

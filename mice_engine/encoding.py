"""Tokenisation and batched lower-layer encoding of queries and documents."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .model import MiceModel

logger = logging.getLogger(__name__)


@dataclass
class TokenizedTexts:
    """``[CLS] text [SEP]`` token ids, one list per text, with how many texts were cut."""

    input_ids: list[list[int]]
    truncated: int

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]


def tokenize(tokenizer, texts: Sequence[str], max_length: int) -> TokenizedTexts:
    """Tokenise each text as ``[CLS] text [SEP]``, cut to ``max_length`` tokens (both special
    tokens included), and count the texts that were cut."""
    pieces = tokenizer(
        list(texts), add_special_tokens=False, truncation=False, return_attention_mask=False,
        return_token_type_ids=False, verbose=False,
    )["input_ids"]
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    room = max_length - 2
    truncated = 0
    sequences = []
    for ids in pieces:
        if len(ids) > room:
            truncated += 1
            ids = ids[:room]
        sequences.append([cls_id, *ids, sep_id])
    return TokenizedTexts(sequences, truncated)


@dataclass
class TokenizedWindows:
    """``[CLS] window [SEP]`` token ids of every window, and how many windows each text has."""

    input_ids: list[list[int]]
    windows_per_text: list[int]

    @property
    def split_texts(self) -> int:
        return sum(1 for count in self.windows_per_text if count > 1)


def tokenize_windows(tokenizer, texts: Sequence[str], max_length: int,
                     stride: int) -> TokenizedWindows:
    """Tokenise each text as one or more ``[CLS] window [SEP]`` sequences of at most
    ``max_length`` tokens. Windows start every ``stride`` tokens, and the last one ends with
    the text."""
    room = max_length - 2
    if not 1 <= stride <= room:
        raise ValueError(f"window stride {stride} must be between 1 and {room} tokens")
    pieces = tokenizer(
        list(texts), add_special_tokens=False, truncation=False, return_attention_mask=False,
        return_token_type_ids=False, verbose=False,
    )["input_ids"]
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    sequences, counts = [], []
    for ids in pieces:
        starts = list(range(0, max(len(ids) - room, 0), stride)) + [max(len(ids) - room, 0)]
        sequences.extend([cls_id, *ids[start : start + room], sep_id] for start in starts)
        counts.append(len(starts))
    return TokenizedWindows(sequences, counts)


def pad(sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"):
    """Right-pad token id lists into (ids, attention mask) tensors."""
    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids.to(device), mask.to(device)


@dataclass
class ForwardTimer:
    """Seconds spent in the lower layers' forward passes alone, summed over calls."""

    seconds: float = 0.0


@torch.inference_mode()
def encode_sequences(
    model: MiceModel,
    sequences: Sequence[Sequence[int]],
    batch_size: int = 32,
    on_batch: Callable[[int, int], None] | None = None,
    timer: ForwardTimer | None = None,
) -> list[np.ndarray]:
    """Run the lower layers on token id lists and return float16 states, one (length, hidden)
    array per sequence, in input order.

    Sequences are encoded in batches sorted by length, so that a batch pads little.
    ``on_batch`` is called with the number of sequences and of tokens after each batch.
    ``timer``, when given, accumulates the time of the forward passes alone, without padding,
    conversion and copies.
    """
    pad_id = model.tokenizer.pad_token_id or 0
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]), reverse=True)
    states: list[np.ndarray | None] = [None] * len(sequences)
    on_gpu = model.device.type == "cuda"
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        ids, mask = pad([sequences[i] for i in rows], pad_id, model.device)
        tick = time.perf_counter()
        hidden = model.encode(ids, mask)
        if timer is not None:
            if on_gpu:
                torch.cuda.synchronize(model.device)
            timer.seconds += time.perf_counter() - tick
        hidden = hidden.to(torch.float16).cpu().numpy()
        for position, i in enumerate(rows):
            states[i] = hidden[position, : len(sequences[i])]
        if on_batch is not None:
            on_batch(len(rows), int(mask.sum()))
    return states  # type: ignore[return-value]


@torch.inference_mode()
def encode_query(model: MiceModel, text: str) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Encode one query; returns (states (1, L, H) float32, mask (1, L), whether it was cut)."""
    tokens = tokenize(model.tokenizer, [text], model.config.query_max_length)
    ids, mask = pad(tokens.input_ids, model.tokenizer.pad_token_id or 0, model.device)
    return model.encode(ids, mask), mask, tokens.truncated > 0

"""Rows from examples: one example per row (padded), or several examples packed into each row.

A packed row holds whole examples end to end, each with its own [CLS] A [SEP] B [SEP], token types and position ids
restarting at 0; the rest of the row is [PAD]. The model keeps each example to itself: the kernels through the batch's
`unpad_plan` (sequence boundaries at position 0, computed here on the CPU, so the encoder needs no host sync), the
reference path through a block-diagonal attention mask (`block_diagonal_mask`).

Rows are filled best-fit from a pool of examples: a row starts with the pool's oldest example (every example leaves
the pool within `pool_size` rows), then takes the longest example that still fits, until none does. A row also keeps
its examples' masked positions within the prediction slots of the batch (`prediction_slots`), so that masking stays
per example (15% of each example's tokens) with a static number of slots per row.
"""

import bisect
from collections import deque
from typing import Any

import numpy as np
import torch

from ..ops import unpad_plan
from .model import prediction_slots, predictions_bound


class Batcher:
    """Batches of rows from an example stream (`ExampleStream` or `ShardExampleStream`); `state_dict()` pins the
    position (the stream's and the packing pool's).

    next_batch(batch_size) -> input_ids, token_type_ids, attention_mask (B, L) int64; packed batches add
    position_ids (B, L) and, with `plan`, `unpad_plan` (an `electra_triton.ops.UnpadPlan`, CPU tensors).
    """

    def __init__(self, stream, max_seq_len: int, cls_id: int, sep_id: int, pad_id: int, packing: bool = False,
                 mask_prob: float = 0.15, pool_size: int = 512, plan: bool = False):
        self.stream = stream
        self.max_seq_len = max_seq_len
        self.cls_id, self.sep_id, self.pad_id = cls_id, sep_id, pad_id
        self.packing = packing
        self.mask_prob = mask_prob
        self.pool_size = pool_size
        self.plan = plan
        self.slots = prediction_slots(max_seq_len, mask_prob, packing)
        self._cls, self._sep = np.array([cls_id]), np.array([sep_id])
        self._bounds = [predictions_bound(length, mask_prob) for length in range(max_seq_len + 1)]
        self._reset_pool()

    def _reset_pool(self) -> None:
        self.arrival: deque[int] = deque()  # pool keys, oldest first; keys already taken are skipped
        self.by_length: list[tuple[int, int]] = []  # (length, key), sorted
        self.examples: dict[int, tuple[Any, int]] = {}  # key -> (example, length)
        self.next_key = 0

    def _add(self, example) -> None:
        key, self.next_key = self.next_key, self.next_key + 1
        length = self.stream.example_length(example)
        self.examples[key] = (example, length)
        self.arrival.append(key)
        bisect.insort(self.by_length, (length, key))

    def _packed_row(self) -> list:
        while len(self.examples) < self.pool_size:
            self._add(self.stream.next_example())
        while self.arrival[0] not in self.examples:
            self.arrival.popleft()
        key = self.arrival.popleft()
        example, length = self.examples.pop(key)
        by_length, bounds = self.by_length, self._bounds
        del by_length[bisect.bisect_left(by_length, (length, key))]
        row = [example]
        space, budget = self.max_seq_len - length, self.slots - bounds[length]
        while space > 0:
            index = bisect.bisect_right(by_length, (space, self.next_key)) - 1
            if index < 0:
                break
            length, key = by_length[index]
            if bounds[length] > budget:
                break
            del by_length[index]
            row.append(self.examples.pop(key)[0])
            space, budget = space - length, budget - bounds[length]
        return row

    def next_batch(self, batch_size: int) -> dict[str, Any]:
        if self.packing:
            rows = [self._packed_row() for _ in range(batch_size)]
        else:
            rows = [[self.stream.next_example()] for _ in range(batch_size)]
        return self.collate(rows)

    def collate(self, rows: list[list]) -> dict[str, Any]:
        """Rows of examples as tensors; each example's [CLS] A [SEP] B [SEP], token types, position ids from 0."""
        pieces: list = []  # the real tokens of the batch, row after row, as arrays (views of the shards)
        segment_lengths: list[int] = []  # [CLS] A [SEP], then B [SEP] (token type 1), alternating, per example
        for examples in rows:
            for example in examples:
                first, second, length_a, length_b = self.stream.materialize(example)
                pieces += [self._cls, *first, self._sep, *second]
                if length_b:
                    pieces.append(self._sep)
                segment_lengths += [length_a + 2, length_b + 1 if length_b else 0]
        segments = np.array(segment_lengths, dtype=np.int64)
        example_lengths = segments[0::2] + segments[1::2]
        row_lengths = np.array([len(examples) for examples in rows])
        row_tokens = np.add.reduceat(example_lengths, np.cumsum(row_lengths) - row_lengths)
        real = np.arange(self.max_seq_len)[None, :] < row_tokens[:, None]  # (B, L); rows never exceed L
        input_ids = np.full(real.shape, self.pad_id, dtype=np.int64)
        input_ids[real] = np.concatenate(pieces)
        token_type_ids = np.zeros(real.shape, dtype=np.int64)
        token_type_ids[real] = np.repeat(np.tile([0, 1], len(example_lengths)), segments)
        batch = {"input_ids": torch.from_numpy(input_ids), "token_type_ids": torch.from_numpy(token_type_ids),
                 "attention_mask": torch.from_numpy(real.astype(np.int64))}
        if self.packing:
            position_ids = np.zeros(real.shape, dtype=np.int64)
            starts = np.cumsum(example_lengths) - example_lengths
            position_ids[real] = np.arange(int(example_lengths.sum())) - np.repeat(starts, example_lengths)
            batch["position_ids"] = torch.from_numpy(position_ids)
        if self.plan:
            batch["unpad_plan"] = unpad_plan(batch["attention_mask"], batch.get("position_ids"))
        return batch

    def state_dict(self) -> dict[str, Any]:
        pool = [self.examples[key][0] for key in self.arrival if key in self.examples]
        return {"stream": self.stream.state_dict(), "pool": pool}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "stream" not in state:
            raise ValueError("the checkpoint's data position predates row packing (it has no packing pool): resume it "
                             "with the electra-triton that wrote it, or start a new run in another --output-dir")
        self.stream.load_state_dict(state["stream"])
        self._reset_pool()
        for example in state["pool"]:
            self._add(self.stream.restore_example(example))

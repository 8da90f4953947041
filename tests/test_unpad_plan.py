"""ops.unpad_plan: real-token indices and sequence boundaries of padded and packed batches."""

import pytest
import torch

from electra_triton.ops import unpad, unpad_input, unpad_plan
from electra_triton.ops.unpad import traceable_unpad_plan


def test_padded_rows_match_unpad_input():
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0], [1, 0, 1, 1]])
    plan = unpad_plan(mask)
    _, indices, cu_seqlens, max_seqlen = unpad_input(mask[..., None], mask)
    assert torch.equal(plan.indices, indices) and torch.equal(plan.cu_seqlens, cu_seqlens)
    assert plan.max_seqlen == max_seqlen == 3 and (plan.batch, plan.seqlen, plan.total_tokens) == (4, 4, 8)
    assert plan.cu_seqlens.dtype == torch.int32 and plan.indices.dtype == torch.int64


def test_position_ids_split_packed_rows_into_examples():
    # Row 0: examples of 3 and 2 tokens, one pad; row 1: one example of 4 tokens, then two examples of 1.
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 0]])
    plan = unpad_plan(mask, position_ids)
    assert plan.cu_seqlens.tolist() == [0, 3, 5, 9, 10, 11]
    assert plan.max_seqlen == 4 and plan.indices.tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11]
    assert plan.packed and not unpad_plan(mask).packed


def test_packed_rows_without_mask_count_every_slot():
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0]])
    plan = unpad_plan(None, position_ids)
    assert plan.indices.tolist() == list(range(6)) and plan.cu_seqlens.tolist() == [0, 3, 5, 6]
    assert plan.packed and plan.max_seqlen == 3 and plan.total_tokens == 6


def test_a_row_always_starts_a_sequence_and_bounds_are_kept():
    mask = torch.ones(2, 3, dtype=torch.long)
    position_ids = torch.tensor([[0, 1, 2], [3, 4, 5]])  # row 1 continues no row: it starts its own sequence
    plan = unpad_plan(mask, position_ids, max_seqlen=8)
    assert plan.cu_seqlens.tolist() == [0, 3, 6] and plan.max_seqlen == 8
    moved = plan.to("cpu")
    assert isinstance(moved, type(plan)) and moved.max_seqlen == 8


def test_bad_arguments_name_themselves():
    with pytest.raises(TypeError, match="attention_mask"):
        unpad_plan([[1, 0]])
    with pytest.raises(ValueError, match="attention_mask"):
        unpad_plan(torch.ones(3))
    with pytest.raises(ValueError, match="position_ids"):
        unpad_plan(torch.ones(2, 3), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="position_ids"):
        unpad_plan(torch.ones(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="max_seqlen"):
        unpad_plan(torch.ones(2, 3), max_seqlen=-1)
    with pytest.raises(ValueError, match="attention_mask may be None only with position_ids"):
        unpad_plan(None)
    with pytest.raises(TypeError, match="position_ids"):
        unpad_plan(None, [[0, 1]])


def test_traceable_plan_is_unpad_plan_as_one_op():
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]])
    plan, expected = traceable_unpad_plan(mask), unpad_plan(mask, max_seqlen=4)
    assert torch.equal(plan.indices, expected.indices) and torch.equal(plan.cu_seqlens, expected.cu_seqlens)
    assert (plan.max_seqlen, plan.batch, plan.seqlen, plan.packed) == (4, 2, 4, False)
    torch.library.opcheck(unpad._plan_of_mask, (mask,), test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(ValueError, match="attention_mask"):
        traceable_unpad_plan(torch.ones(3))

"""``verify`` without services: the merge of two sorted row streams its reconciliation rests on."""

from __future__ import annotations

from cdc.ops.verify import merge_sorted


def test_merge_sorted_pairs_keys_from_both_sides():
    left = [(1, "a"), (3, "c"), (4, "d"), (9, "i")]
    right = [(2, "B"), (3, "C"), (9, "I"), (10, "J")]
    merged = [
        (k, lv if isinstance(lv, str) else None, rv if isinstance(rv, str) else None)
        for k, lv, rv in merge_sorted(left, right)
    ]
    assert merged == [
        (1, "a", None),
        (2, None, "B"),
        (3, "c", "C"),
        (4, "d", None),
        (9, "i", "I"),
        (10, None, "J"),
    ]
    assert list(merge_sorted([], [])) == []

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from capacitor_trio.domain.ordering import sop_class_rank

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
SR = "1.2.840.10008.5.1.4.1.1.88.22"
PR = "1.2.840.10008.5.1.4.1.1.11.1"
OTHER = "1.2.3.4"


def test_none_is_fifo():
    rank = sop_class_rank(None)
    assert rank(CT) == rank(SR) == rank(OTHER) == 0


def test_listed_order_and_unlisted_lowest():
    rank = sop_class_rank([SR, PR])
    assert rank(SR) < rank(PR) < rank(CT)
    assert rank(CT) == rank(OTHER)


def test_default_marks_unlisted_position():
    rank = sop_class_rank([SR, "default", MR])
    assert rank(SR) < rank(CT) == rank(OTHER) < rank(MR)
    assert sop_class_rank([" Default ", CT])(OTHER) < sop_class_rank([" Default ", CT])(CT)


def test_whitespace_and_duplicates():
    rank = sop_class_rank([f" {SR} ", MR, SR])
    assert rank(SR) == 0
    assert rank(MR) == 1
    assert rank(f"{SR} ") == 0


def test_empty_list_all_equal():
    rank = sop_class_rank([])
    assert rank(CT) == rank(OTHER)


def test_sort_stable_within_rank():
    rank = sop_class_rank([SR, "default"])
    queue = [(1, CT), (2, SR), (3, MR), (4, SR), (5, CT)]
    ordered = sorted(queue, key=lambda item: (rank(item[1]), item[0]))
    assert [n for n, _ in ordered] == [2, 4, 1, 3, 5]


@given(
    st.lists(st.sampled_from([CT, MR, SR, PR, "default"]), unique=True),
    st.sampled_from([CT, MR, SR, PR, OTHER]),
)
def test_rank_is_position_of_first_match(priorities, uid):
    rank = sop_class_rank(priorities)
    if uid in priorities:
        assert rank(uid) == priorities.index(uid)
    elif "default" in priorities:
        assert rank(uid) == priorities.index("default")
    else:
        assert rank(uid) == len(priorities)

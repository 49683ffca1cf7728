"""The slice merge that every read relies on: newest slice on top, gaps are zeros."""
import random

from torchjuice.meta import Slice
from torchjuice.vfs.reader import merge_slices


def render(slices, length):
    """What the merged view reads as, with slice bytes named (id, offset)."""
    out = [None] * length
    for start, end, sid, _size, off in merge_slices(slices):
        for i in range(start, end):
            out[i] = None if sid == 0 else (sid, off + i - start)
    return out


def naive(slices, length):
    out = [None] * length
    for s in slices:
        for i in range(s.pos, s.pos + s.len):
            out[i] = None if s.id == 0 else (s.id, s.off + i - s.pos)
    return out


def test_single_slice_and_gaps():
    assert merge_slices([Slice(10, 7, 100, 0, 5)]) == [(10, 15, 7, 100, 0)]
    assert render([Slice(10, 7, 100, 0, 5)], 20)[:10] == [None] * 10


def test_newer_slice_splits_older():
    segs = merge_slices([Slice(0, 1, 100, 0, 100), Slice(40, 2, 10, 0, 10)])
    assert segs == [(0, 40, 1, 100, 0), (40, 50, 2, 10, 0), (50, 100, 1, 100, 50)]


def test_hole_slice_hides_older_data():
    segs = merge_slices([Slice(0, 1, 100, 0, 100), Slice(30, 0, 0, 0, 70)])
    assert segs == [(0, 30, 1, 100, 0), (30, 100, 0, 0, 0)]


def test_random_overlays_match_naive_model():
    rng = random.Random(7)
    for _ in range(300):
        slices = []
        for sid in range(1, rng.randint(1, 12)):
            pos = rng.randrange(0, 200)
            ln = rng.randint(0, 60)
            slices.append(Slice(pos, sid if rng.random() > 0.2 else 0, 1000, rng.randrange(0, 50), ln))
        assert render(slices, 300) == naive(slices, 300)

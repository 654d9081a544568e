"""The decode graphs' host copy of the block tables is restaged only where a table changed, and
every change of a sequence's blocks is seen (``BlockList.version``)."""

from __future__ import annotations

import numpy as np

from engine_server.engine.cuda_graphs import StagedRows
from engine_server.engine.engine import BlockList, _Sequence


def Seq(blocks: list[int]) -> _Sequence:
    seq = _Sequence("r", [], 0, 0.0)
    seq.blocks = blocks  # the engine's sequences keep any list they are given as a BlockList
    return seq


def expected(seqs, size: int, width: int) -> np.ndarray:
    out = np.zeros((size, width), dtype=np.int32)
    for i, s in enumerate(seqs):
        out[i, : len(s.blocks)] = s.blocks
    return out


def test_every_change_to_a_block_list_gives_it_a_new_version() -> None:
    blocks = BlockList([1, 2, 3])
    seen = {blocks.version}
    changes = [
        lambda b: b.append(4), lambda b: b.extend([5]), lambda b: b.insert(0, 9), lambda b: b.pop(),
        lambda b: b.remove(9), lambda b: b.__setitem__(0, 7), lambda b: b.__delitem__(slice(2, None)),
        lambda b: b.__iadd__([8]), lambda b: b.sort(), lambda b: b.reverse(), lambda b: b.clear(),
    ]  # fmt: skip
    for change in changes:
        change(blocks)
        assert blocks.version not in seen
        seen.add(blocks.version)
    assert BlockList([1]).version not in seen  # a new list never reuses a number


def test_staged_rows_follow_appends_replacements_truncations_and_new_batches() -> None:
    rows = np.zeros((8, 6), dtype=np.int32)
    staged = StagedRows(rows)
    a, b, c = Seq([1, 2]), Seq([3]), Seq([4, 5, 6])
    staged.write([a, b, c], 4)
    assert (rows[:4] == expected([a, b, c], 4, 6)).all()
    a.blocks.append(7)  # a new block
    b.blocks[0] = 8  # a copied (formerly shared) block
    c.blocks = [4]  # a new list (as a fork or a release assigns), shorter: its old tail must go
    staged.write([a, b, c], 4)
    assert (rows[:4] == expected([a, b, c], 4, 6)).all()
    staged.write([c, a], 4)  # other sequences in rows 0 and 1; rows 2 and 3 are padding
    assert (rows[:4] == expected([c, a], 4, 6)).all()
    del a.blocks[1:]
    staged.write([c, a, b], 4)
    assert (rows[:4] == expected([c, a, b], 4, 6)).all()


def test_unchanged_rows_are_not_written_again() -> None:
    rows = np.zeros((4, 4), dtype=np.int32)
    staged = StagedRows(rows)
    a = Seq([1, 2])
    staged.write([a], 1)
    rows[0, 0] = 99  # a write the stager would undo if it rewrote the row
    staged.write([a], 1)
    assert rows[0, 0] == 99
    a.blocks.append(3)
    staged.write([a], 1)
    assert list(rows[0]) == [1, 2, 3, 0]

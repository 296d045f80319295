from ovseg_mine.mine.graph.rows import ImageResult
from ovseg_mine.mine.run.inflight import InFlightShards


def _row(shard: int, row: int, size: int) -> ImageResult:
    return ImageResult(
        image_id=100 * shard + row, file_name="x.jpg", shard=shard, shard_size=size, shard_row=row, width=1, height=1
    )


def test_a_shard_completes_when_all_its_rows_arrived_in_any_order_once():
    inflight = InFlightShards(closed={7})
    assert inflight.add(_row(0, 2, 3)) and inflight.add(_row(1, 0, 1)) and inflight.add(_row(0, 0, 3))
    assert inflight.pop_complete(0) is None
    assert not inflight.add(_row(0, 2, 3))  # a retried batch's duplicate
    assert inflight.unfinished() == {0: (2, 3), 1: (1, 1)}
    assert [r.image_id for r in inflight.pop_complete(1)] == [100]
    assert inflight.add(_row(0, 1, 3))
    assert [r.shard_row for r in inflight.pop_complete(0)] == [0, 1, 2]
    assert not inflight.add(_row(0, 1, 3)) and not inflight.add(_row(7, 0, 1))  # closed shards
    assert len(inflight) == 0 and inflight.unfinished() == {}
    assert inflight.started(0) and not inflight.started(3)

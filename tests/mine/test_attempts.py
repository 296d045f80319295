"""The attempt tracker: deaths are starts that never ended, counted per image, kept across attempts."""

from ovseg_mine.mine.graph.attempts import AttemptTracker, worker_death_reason


def test_a_batch_that_died_then_its_images_one_at_a_time():
    tracker = AttemptTracker()
    assert tracker.begin([1, 2, 3]) == [0, 0, 0]
    tracker.end([1, 2, 3])
    assert tracker.begin([4, 5, 6]) == [0, 0, 0]  # the worker dies on this batch: nothing ended
    assert tracker.begin([4, 5, 6]) == [1, 1, 1]  # the retry sees one death each and goes one image at a time
    tracker.end([4, 5, 6])
    assert tracker.begin([4]) == [1]
    tracker.end([4])
    assert tracker.begin([5]) == [1]  # the worker dies on image 5
    assert tracker.begin([4, 5, 6]) == [1, 2, 1]  # only image 5 gets the second death
    tracker.end([4, 5, 6])
    assert tracker.begin([1]) == [0]  # an image that ended has no death


def test_reason_names_the_count():
    assert worker_death_reason(3).startswith("the worker process died 3 times while mining this image")

"""``ovseg-mine inspect``: quality figures of a run (:mod:`~ovseg_mine.inspect.quality`), its HTML report
(:mod:`~ovseg_mine.inspect.report`) and the noun -> COCO category table (:mod:`~ovseg_mine.inspect.synonyms`)."""

"""``ovseg-mine inspect``: quality figures of a run (:mod:`~ovseg_mine.inspect.quality`), its HTML report
(:mod:`~ovseg_mine.inspect.report`, rendered from the jinja2 templates ``report.html.j2`` and ``gallery.html.j2``)
and the noun -> COCO category table (:mod:`~ovseg_mine.inspect.synonyms`)."""

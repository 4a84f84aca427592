"""``ocrbatch report`` and ``ocrbatch inspect``: a job's pages as HTML, with the boxes it read."""

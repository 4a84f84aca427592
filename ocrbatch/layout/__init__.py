"""Layout analysis and what is built on it: blocks, reading order, stitching, tables, spotting, Markdown."""

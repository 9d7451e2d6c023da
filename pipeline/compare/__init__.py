"""``gptpipe compare``: which differences between runs are larger than their noise."""

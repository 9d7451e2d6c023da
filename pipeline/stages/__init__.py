"""One module per DVC stage; each defines ``main`` (a click command) and ``run``."""

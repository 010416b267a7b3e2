"""The checkpoint layer below ``train/`` and ``infer/``: self-describing weights files (:mod:`.files`), bundles of
them per method with the one locator, load and save function, the shipped folder and its manifest (:mod:`.bundle`),
all reading the network kinds table (:mod:`thinslice.models.kinds`). Training saves through it and inference loads
through it, so neither imports the other. (The device resolver is the base module :mod:`thinslice.device`.)"""

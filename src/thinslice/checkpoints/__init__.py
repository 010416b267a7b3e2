"""The checkpoint layer below ``train/`` and ``infer/``: self-describing weights files (:mod:`.files`) and bundles of
them per method with the shipped folder and its manifest (:mod:`.bundle`). Training saves through it and inference
loads through it, so neither imports the other. (The device resolver is the base module :mod:`thinslice.device`.)"""

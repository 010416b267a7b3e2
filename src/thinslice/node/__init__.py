"""The DICOM node (``thinslice serve``): receive thick series from a PACS, send thin series back into their study.

A hospital routes each thick series to the node's AE title; the node spools every instance atomically, waits until
the series is stable, applies the rule file (which series, which method, where the result goes), runs the same
per-case function as ``thinslice batch`` and sends the derived series with C-STORE and/or writes it to a folder.
The job queue is a SQLite database in the spool, so that a killed node resumes where it stopped and sends nothing
twice.
"""

"""Tables the program writes for spreadsheets (``cases.csv``, ``series.csv``): cells that cannot run as formulas.

A spreadsheet runs a cell that starts with ``=``, ``+``, ``-`` or ``@`` (and, in some, a tab or carriage return) as
a formula; a patient id or a file name from an archive such as ``=HYPERLINK(...)`` or ``=cmd|' /c calc'!A0`` would
then run when a user opens the ledger. As the OWASP rule for CSV injection says, such a text cell gets a leading
single quote, which spreadsheets show as text and do not evaluate. Numbers (negative HU included) are left as
numbers: they are written from Python numbers, never from text that came from the data.
"""

from __future__ import annotations

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value: object) -> object:
    """``value`` for a CSV cell: a text that would start a formula, prefixed with ``'``; anything else unchanged."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value

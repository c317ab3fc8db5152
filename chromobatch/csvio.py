"""One tolerant reader for the small CSV files labs hand us (labels.csv, corrections, manifests).

Rows with the wrong number of fields or unparseable text become per-line problems instead of crashes;
callers decide whether a problem skips the line (ingest) or rejects the whole file (review, training).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from dataclasses import dataclass, field

#: Longest field accepted (csv's own limit is 128 KiB; anything near it is not a label file).
FIELD_LIMIT = 4096


@dataclass
class Table:
    header: list[str]
    #: (line number, {column: stripped value}) for every well-formed, non-empty row.
    rows: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    #: "line N: what is wrong" for every row that could not be read.
    problems: list[str] = field(default_factory=list)


class HeaderError(ValueError):
    """The first line is not a usable header."""


def read_table(text: str, required_any: Iterable[Iterable[str]]) -> Table:
    """Parse CSV text whose first line is a header holding one of the `required_any` column sets.

    Column names are stripped and lower-cased; values are stripped.
    """
    reader = csv.reader(io.StringIO(text))
    try:
        raw_header = next(reader, None)
    except csv.Error as exc:
        raise HeaderError(f"unreadable header: {exc}") from None
    header = [h.strip().lower() for h in (raw_header or [])]
    options = [set(cols) for cols in required_any]
    if not any(cols <= set(header) for cols in options):
        wanted = " or ".join("'" + ",".join(sorted(cols)) + "'" for cols in options)
        raise HeaderError(f"header must hold the columns {wanted}, got {','.join(header) or 'nothing'}")
    table = Table(header=header)
    while True:
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            table.problems.append(f"line {reader.line_num}: unreadable ({exc}); the rest of the file is skipped")
            break
        lineno = reader.line_num
        if not any(v.strip() for v in values):
            continue
        if len(values) > len(header) and any(v.strip() for v in values[len(header):]):
            table.problems.append(f"line {lineno}: {len(values)} fields, the header has {len(header)}")
            continue
        if any(len(v) > FIELD_LIMIT for v in values):
            table.problems.append(f"line {lineno}: a field is longer than {FIELD_LIMIT} characters")
            continue
        values = values + [""] * (len(header) - len(values))
        table.rows.append((lineno, {h: v.strip() for h, v in zip(header, values, strict=False)}))
    return table

"""Files a case folder may carry besides chromosomes, and labels.csv (file,label) read into labels.

Never treated as images: a lab's notes, exports and markers must not become rejected "chromosomes".
"""

from __future__ import annotations

from pathlib import Path

from chromobatch import normalise_label
from chromobatch.csvio import HeaderError, read_table

#: Files a case folder may carry besides chromosomes; never treated as images.
SIDECAR_NAMES = {"labels.csv", "truth.json", "ready", "ready.txt"}

SIDECAR_SUFFIXES = {".csv", ".json", ".txt", ".md", ".xml", ".log", ".pdf", ".html"}


def is_sidecar(name: str) -> bool:
    lower = name.lower()
    return lower in SIDECAR_NAMES or Path(lower).suffix in SIDECAR_SUFFIXES


def read_labels(case_dir: Path) -> tuple[dict[str, str], list[str]]:
    """labels.csv of a case folder as {file: class}, and the problems found in it (each names its line)."""
    labels: dict[str, str] = {}
    problems: list[str] = []
    path = case_dir / "labels.csv"
    if not path.is_file() or path.is_symlink():
        return labels, problems
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        return labels, [f"labels.csv: unreadable ({exc})"]
    try:
        table = read_table(text, [("file", "label")])
    except HeaderError as exc:
        return labels, [f"labels.csv: {exc}"]
    problems += [f"labels.csv {p}" for p in table.problems]
    for lineno, row in table.rows:
        name = row.get("file", "").replace("\\", "/")
        if not name or name.startswith("/") or ".." in name.split("/"):
            problems.append(f"labels.csv line {lineno}: bad file name {name[:200]!r}")
            continue
        try:
            labels[name] = normalise_label(row.get("label", ""))
        except ValueError as exc:
            problems.append(f"labels.csv line {lineno}: {str(exc)[:200]}")
    return labels, problems

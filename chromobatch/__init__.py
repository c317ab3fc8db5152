"""chromobatch: batch chromosome classification and karyogram reports for cytogenetics labs.

The package root holds the names every layer shares (the 24 classes, label and case ID rules); the
rooms below it are described in docs/architecture.md and in each package's own docstring.
"""

import re

__version__ = "0.1.0"

#: Class names in model output order: index k is class CLASSES[k] (the paper's y_gt = 0..23).
CLASSES: tuple[str, ...] = tuple([str(i) for i in range(1, 23)] + ["X", "Y"])
NUM_CLASSES = len(CLASSES)
CLASS_INDEX: dict[str, int] = {name: i for i, name in enumerate(CLASSES)}


def normalise_label(label: str | int) -> str:
    """Turn '1'..'22', 'X', 'Y' (also 'chr1', 'x', 23, 24) into a canonical class name, or raise ValueError."""
    text = str(label).strip()
    if text.lower().startswith("chr"):
        text = text[3:]
    text = text.upper()
    if text == "23":
        text = "X"
    elif text == "24":
        text = "Y"
    if text.isdigit():
        text = str(int(text))
    if text not in CLASS_INDEX:
        raise ValueError(f"not a chromosome class: {label!r} (expected 1-22, X or Y)")
    return text


#: A case ID is a folder name: it goes into file names, URLs and log lines, so it is kept plain.
CASE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def validate_case_id(name: str) -> str:
    """The case ID itself, or InvalidCaseId (every layer may check it: intake, the queue, the web)."""
    if not CASE_ID_RE.match(name) or ".." in name:
        from chromobatch.errors import InvalidCaseId

        raise InvalidCaseId(f"invalid case ID {name!r}: use letters, digits, '-', '_' and '.' (max 128)")
    return name

"""chromobatch: batch chromosome classification and karyogram reports for cytogenetics labs."""

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

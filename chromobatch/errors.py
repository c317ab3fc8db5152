"""One exception tree for chromobatch.

Library code raises these; the CLI turns any ChromobatchError into one red line, a hint and exit code 1.
Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class ChromobatchError(Exception):
    """Base of every error a user can act on."""

    hint: str = ""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint


class ConfigError(ChromobatchError):
    hint = "Check chromobatch.toml, CHROMOBATCH_* variables and flags (`chromobatch config show`)."


class DatabaseError(ChromobatchError):
    hint = "Check --db (a SQLite path or a postgresql+psycopg:// URL) and run `chromobatch db upgrade`."


class InputError(ChromobatchError):
    """A case folder or file that cannot be used."""

    hint = "Fix or remove the named file and process the case again."


class InvalidCaseId(InputError):
    hint = "Rename the case folder to letters, digits, '-', '_' and '.' only."


class RejectedFile(InputError):
    """One file of a case could not be used; the rest of the case goes on."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class EmptyCase(InputError):
    hint = "The case folder holds no usable chromosome image; see the rejected files listed above."


class CaseNotFound(ChromobatchError):
    hint = "List known cases with `chromobatch status`."


class ModelError(ChromobatchError):
    hint = "Pass --model with a model folder (model.safetensors + model.json) or promote one with `chromobatch models`."


class DataError(ChromobatchError):
    """Training or evaluation data that cannot be used."""

    hint = "Check --data (a folder of class sub-folders or a manifest CSV path,label[,patient,cell,split])."


class JobError(ChromobatchError):
    hint = "See `chromobatch status` for the job's error."


class ReviewError(ChromobatchError):
    """A review request that names something that does not exist or is not allowed."""

    hint = "List the case's chromosomes with their numbers: `chromobatch review CASE`."


class CellNotFound(ReviewError):
    pass


class ChromosomeNotFound(ReviewError):
    pass


class InvalidLabel(ReviewError):
    hint = "Labels are 1-22, X or Y (also accepted: chr1, x, 23 for X, 24 for Y)."


class CorrectionsFileError(InputError):
    hint = "The file needs a header `file,label` or `cell,chromosome,label`; nothing was changed."


#: Exit code of `chromobatch train --db` when another training run holds the lock (EX_TEMPFAIL).
LOCKED_EXIT_CODE = 75


class TrainingLocked(ChromobatchError):
    """Another training run holds the lock; not an error for a timer, so it has its own exit code."""

    hint = "Another `chromobatch train --db` is running; this run did nothing. Try again when it has finished."
    exit_code = LOCKED_EXIT_CODE


class CaseSigned(ReviewError):
    """A change to a case that is signed off: it is read-only until a reviewer reopens it."""

    hint = "Reopen the case first (recorded with who and why), then change it."


class ReviewChanged(ReviewError):
    """A sign-off over a case that another reviewer changed after the signer's page was loaded."""

    hint = "Reload the case, look at the changes, then sign it off."


class CaseNotProcessed(ReviewError):
    """A sign-off of a case that is not processed (yet, or being processed again, or failed)."""

    hint = "Wait until the case is processed (status done), then sign it off."


class InvalidKaryotype(ReviewError):
    hint = "Write an ISCN karyotype: count,sex chromosomes[,changes], e.g. 47,XY,+21 or 46,XX."


class UserError(ChromobatchError):
    """A local account of the web review that cannot be created, found or changed as asked."""

    hint = "List the accounts with `chromobatch users list`; roles are viewer, reviewer and admin."


class WebError(ChromobatchError):
    hint = "See `chromobatch serve --help`."

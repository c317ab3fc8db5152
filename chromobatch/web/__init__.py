"""web: the review workstation in the browser (`chromobatch serve`). Local accounts and their password hashes
(`users`), sessions, CSRF tokens and the login rate limit (`security`), the review decisions a signed-in user
makes (`edits`: labels through review.labels' audit trail, swaps, "not a chromosome", cell roles, typed
karyotypes, sign-off and reopening), what each page shows (`pages`: the case list, a case, a cell's karyogram
from report.layout, thumbnails, the outlined metaphase) and the FastAPI application (`app`: routes, roles,
templates and the vendored static files in templates/ and static/; nothing is fetched from a CDN).

URLs carry database keys (case, cell and chromosome primary keys), never a case ID or a file name, and log
lines name users and keys only: case IDs may be patient identifiers.

May import: service (re-rendering the report), review, report, karyotype, intake (imaging), ml (geometry),
store, and the bottom.
"""

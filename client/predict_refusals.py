"""What `radfed predict` raises when it gives no probability, and its exit codes.

A refusal carries the reason, the fix and (when known) the case. ``PredictRefusal`` (exit 2) is about the
model, the site or the usage; ``CaseRefusal`` (exit 1) is about the case itself. The model file
(``client.modelfile``), the harmonisation parameters (``client.harmonization_params``) and the predict flow
(``client.predict``) all raise them; the command (``radfed.cli.site``) turns them into a message and an
exit code.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_BAD_CASE = 1
EXIT_REFUSED = 2


class PredictRefusal(Exception):
    """radfed predict cannot give a probability: what is wrong, the fix, and the exit code."""

    exit_code = EXIT_REFUSED
    status = "refused"

    def __init__(self, reason: str, fix: str, case_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.fix = fix
        self.case_id = case_id


class CaseRefusal(PredictRefusal):
    """The case itself cannot be scored (bad input or a non-finite feature)."""

    exit_code = EXIT_BAD_CASE
    status = "bad-input"

"""What every preprocessing step needs besides its files."""

from __future__ import annotations

from dataclasses import dataclass

from medtx.data.scan_ids import scan_identity
from medtx.provenance.records import StepRecord


@dataclass(frozen=True)
class StepContext:
    """Scan identity, backend, seed and QC thresholds shared by the steps.

    Attributes:
        scan: scan id used in file names (``sub-01`` or ``sub-01_ses-1``).
        backend: the resolved backend, ``fsl`` or ``ants``.
        seed: recorded in provenance; seeds antspyx registration.
        subject, session: recorded in each step record (the collect step reads
            the scan's identity from there) and named in errors.
        rerun: the step's code hash and settings digest, recorded so that a later
            job can tell the step need not run again (``medtx.preprocess.steps``).
    """

    scan: str
    backend: str = "ants"
    seed: int | None = 42
    dataset: str | None = None
    subject: str | None = None
    session: str | None = None
    threads: int = 1
    deterministic: bool = True
    rerun: dict[str, str] | None = None

    def record(self, step: str, params: dict) -> StepRecord:
        return StepRecord(
            step,
            scan=self.scan,
            backend=self.backend,
            params=params,
            seed=self.seed,
            dataset=self.dataset,
            subject=self.subject,
            session=self.session,
            rerun=self.rerun,
        )


def step_context(
    context: dict, *, scan: str | None = None, dataset: str | None = None, brats: bool = False
) -> StepContext:
    """A rule's static context (backend, seed, threads, deterministic) plus the scan.

    Rules pass only the scan id; subject and session are read back from it
    (``scan_identity``), so planning needs no per-scan params.
    """
    context = dict(context)
    if scan:
        context.update(scan=scan, **scan_identity(scan, brats=brats))
    if dataset:
        context["dataset"] = dataset
    return StepContext(**context)

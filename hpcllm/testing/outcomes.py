"""One outcome for a test that ran in several ranks, in pytest's own words.

The ranks report through files (ranks.py); here their results become one verdict (a failure on
any rank fails the test, in the phase it happened; an xfail on any rank is the test's xfail; all
skipped is a skip; all xpassed an xpass), and the verdict becomes the setup/call/teardown reports
pytest's runner would have made, so xfail, xpass, strict xfail, skip and a fixture's error end as
they would without the plugin.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from _pytest.reports import TestReport

from hpcllm.testing.ranks import JobResult


@dataclass(frozen=True)
class Verdict:
    """The whole job's outcome in pytest's words, the phase it happened in, and the text."""

    outcome: str  # passed | failed | skipped | xfailed | xpassed
    text: str = ""
    when: str = "call"
    wasxfail: str | None = None


def job_verdict(job: JobResult, ranks_dir: Path) -> Verdict:
    """The outcome of the whole job. A failure on any rank fails it (in the phase of the first
    failing rank: a fixture's error stays an error); an xfail that happened on any rank is the
    test's xfail, even when the failing rank ended the others; all ranks skipped is a skip; all
    xpassed is an xpass."""
    results = job.results.values()
    xfailed = [res for res in results if res.outcome == "xfailed"]
    if xfailed and not job.failed_ranks and not job.timed_out:
        return Verdict("xfailed", xfailed[0].longrepr, "call", xfailed[0].wasxfail)
    outcome, text = _failure_or_success(job, ranks_dir)
    if outcome == "failed":
        when = job.results[job.failed_ranks[0]].when if job.failed_ranks else "call"
        return Verdict("failed", text, when)
    outcomes = {res.outcome for res in results}
    if outcomes == {"xpassed"}:
        return Verdict("xpassed", "", "call", job.results[0].wasxfail)
    return Verdict(outcome, text)


def _failure_or_success(job: JobResult, ranks_dir: Path) -> tuple[str, str]:
    """(outcome, longrepr text) of the whole job."""
    tail = job.output[-6000:]
    if job.timed_out:
        parts = [
            f"timed out: killed all {job.ranks} ranks after {job.duration:.1f} s; Python stack of each rank:"
        ]
        for rank in range(job.ranks):
            stack = job.stacks.get(rank)
            status = job.results.get(rank)
            if stack:
                parts.append(f"===== rank {rank} =====\n{stack.rstrip()}")
            elif status is not None:
                parts.append(f"===== rank {rank}: {status.outcome}, was not stuck =====")
            else:
                parts.append(f"===== rank {rank}: no stack (not started or already gone) =====")
        parts.append(f"----- launcher output (tail) -----\n{tail}")
        return "failed", "\n".join(parts)
    if job.failed_ranks:
        parts = []
        for rank in job.failed_ranks:
            res = job.results[rank]
            parts.append(f"rank {rank} of {job.ranks} failed (in {res.when}):\n{res.longrepr}")
        others = [
            f"rank {r}: {job.results[r].outcome}" if r in job.results else f"rank {r}: aborted"
            for r in range(job.ranks)
            if r not in job.failed_ranks
        ]
        if others:
            parts.append("other ranks: " + ", ".join(others))
        return "failed", "\n\n".join(parts)
    if job.missing_ranks:
        return "failed", (
            f"rank(s) {job.missing_ranks} of {job.ranks} reported no result (crashed, or the launcher "
            f"failed; exit code {job.returncode}); rank files kept in {ranks_dir}\n"
            f"----- launcher output (tail) -----\n{tail}"
        )
    if job.returncode != 0:
        return "failed", (
            f"every rank passed, but the launcher exited with {job.returncode} (a rank failed in "
            f"teardown or MPI_Finalize)\n----- launcher output (tail) -----\n{tail}"
        )
    outcomes = {res.outcome for res in job.results.values()}
    if outcomes == {"skipped"}:
        return "skipped", job.results[0].longrepr
    return "passed", ""


def reports(
    item: pytest.Item, verdict: Verdict, job: JobResult | None, teardown_error: str
) -> list[TestReport]:
    """setup/call/teardown reports of the whole job, as pytest's runner would make them for the
    verdict; the report of the phase carries the captured output of the failing ranks (or rank 0's)."""
    sections: list[tuple[str, str]] = []
    if job is not None:
        for rank in job.failed_ranks or ([0] if 0 in job.results else []):
            sections += [(f"{title} (rank {rank})", body) for title, body in job.results[rank].sections]

    duration = job.duration if job is not None else 0.0

    def report(when: str, outcome: str, longrepr: Any = None, **extra: Any) -> TestReport:
        return TestReport(
            item.nodeid,
            item.location,
            dict.fromkeys(item.keywords, 1),
            outcome,
            longrepr,
            when,
            sections=sections if when == verdict.when else [],
            duration=duration if when == verdict.when else 0.0,
            **extra,
        )

    teardown = (
        report("teardown", "failed", teardown_error) if teardown_error else report("teardown", "passed")
    )
    text = verdict.text or None
    if verdict.outcome == "skipped":
        path, lineno, _ = item.location
        return [report("setup", "skipped", (str(path), (lineno or 0) + 1, verdict.text)), teardown]
    if verdict.outcome == "failed" and verdict.when == "setup":  # an error, as pytest counts it
        return [report("setup", "failed", text), teardown]
    if verdict.outcome == "failed" and verdict.when == "teardown":
        return [report("setup", "passed"), report("call", "passed"), report("teardown", "failed", text)]
    if verdict.outcome in ("xfailed", "xpassed"):
        outcome = "skipped" if verdict.outcome == "xfailed" else "passed"
        call = report(
            "call", outcome, text if outcome == "skipped" else None, wasxfail=verdict.wasxfail or ""
        )
        return [report("setup", "passed"), call, teardown]
    return [report("setup", "passed"), report("call", verdict.outcome, text), teardown]


def outcome_of(report: TestReport) -> str | None:
    """pytest's word for a report (None for a setup or teardown that passed)."""
    xfail = hasattr(report, "wasxfail")
    if report.failed:
        return "failed"
    if report.skipped:
        return "xfailed" if xfail else "skipped"
    if report.when == "call":
        return "xpassed" if xfail else "passed"
    return None

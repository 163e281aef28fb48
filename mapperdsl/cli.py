"""The ``mapperdsl`` command: plan, run, preview, resume, abandon, stop, status, history,
rejects.

A mapping file is a Python module; ``FILE:NAME`` picks the mapping variable
``NAME``, and plain ``FILE`` the only mapping in it. Exit codes: 0 succeeded,
1 failed, 2 the mapping or the command line is wrong (nothing ran), 3 stopped,
4 refused (another run holds the lease, or an unfinished job must be resumed or
abandoned first).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click
import polars as pl

import mapperdsl as md
from mapperdsl.dsl.parts import run_file
from mapperdsl.dsl.url import redact_text

OK, FAILED, WRONG, STOPPED, REFUSED = 0, 1, 2, 3, 4
STATUS_EXIT = {"SUCCEEDED": OK, "FAILED": FAILED, "STOPPED": STOPPED}


def _fail(code: int, message: str) -> NoReturn:
    click.echo(f"mapperdsl: {redact_text(message)}", err=True)
    sys.exit(code)


def load_mapping(spec: str) -> md.Mapping:
    """The mapping ``FILE[:NAME]`` names; exits 2 with the choices when it is not clear."""
    path, _, name = spec.partition(":")
    if not Path(path).is_file():
        _fail(WRONG, f"mapping file {path!r} does not exist" + (
            "" if path.endswith(".py") else " (a job by its id needs --target URL)"))
    try:
        found = run_file(path)
    except md.MapperError as exc:
        _fail(WRONG, f"{path}: {exc}")
    except Exception as exc:
        _fail(WRONG, f"{path} failed to load: {type(exc).__name__}: {exc}")
    # Templates (a mapping still missing its source, key or target) are not candidates.
    mappings = {k: v for k, v in found.items() if isinstance(v, md.Mapping) and not v.missing()}
    if name:
        template = found.get(name)
        if isinstance(template, md.Mapping) and template.missing():
            _fail(WRONG, f"{path}:{name} is a template, not a whole mapping: "
                         f"{'; '.join(template.missing())}")
        if name not in mappings:
            _fail(WRONG, f"{path} has no mapping {name!r}; mappings: "
                         f"{', '.join(sorted(mappings)) or 'none'}")
        return mappings[name]
    if len(mappings) != 1:
        listing = "\n".join(f"  {path}:{k}  ({v.name})" for k, v in sorted(mappings.items()))
        _fail(WRONG, f"{path} holds {len(mappings)} mappings; name one:\n{listing}"
              if mappings else f"{path} holds no mapping (md.mapping(...) assigned to a name)")
    return next(iter(mappings.values()))


def _guard(action: Callable[[], Any]) -> Any:
    """Run ``action``; map mapperdsl's errors to exit codes and one clear line."""
    try:
        return action()
    except (md.LeaseHeldError, md.UnfinishedJobError) as exc:
        _fail(REFUSED, str(exc))
    except (md.DeclarationError, md.PlanError, md.NoSuchJobError) as exc:
        _fail(WRONG, str(exc))
    except md.MapperError as exc:
        _fail(FAILED, f"{type(exc).__name__}: {exc}")


def _frame_out(frame: pl.DataFrame, as_json: bool) -> None:
    """Every column as JSON; for a terminal, a plain table of what a person reads first
    (a job's table, host and progress, a chunk's retries, are in the JSON)."""
    if as_json:
        click.echo(json.dumps(frame.to_dicts(), default=str, indent=2))
        return
    jobs = "chunks_total" in frame.columns
    if jobs:
        frame = frame.with_columns(chunks=pl.format("{}/{}", "chunks_done", "chunks_total"))
    if frame.is_empty():
        click.echo("(none)")
        return
    first = ["job_id", "mapping", "status", "started_at", "seconds", "chunks"] \
        if jobs else []  # a job: when, how long
    last = [c for c in ("message", "error", "row") if c in frame.columns]  # long text last
    rest = [c for c in frame.columns if c not in (*_LEFT_OUT, *first, *last)]
    frame = frame.select(*first, *rest, *last).with_columns(
        pl.col(pl.Datetime).dt.strftime("%Y-%m-%d %H:%M:%S"), pl.col(pl.Float64).round(2),
        pl.col(pl.String, pl.Null).cast(pl.String).fill_null("")  # a | or a line break
        .str.replace_all("|", "\\|", literal=True).str.replace_all("\n", " / ", literal=True))
    with pl.Config(tbl_rows=-1, tbl_cols=-1, fmt_str_lengths=80, tbl_width_chars=1000,
                   tbl_hide_column_data_types=True, tbl_hide_dataframe_shape=True,
                   tbl_formatting="ASCII_MARKDOWN"):
        click.echo(frame)


_LEFT_OUT = ("target_table", "host", "progress", "chunks_done", "chunks_total", "retries",
             "finished_at")


def _finish(result: md.JobResult, as_json: bool) -> NoReturn:
    if as_json:
        click.echo(json.dumps({"job_id": result.job_id, "status": result.status,
                               "counts": result.counts(), "message": result.message},
                              default=str))
    else:
        click.echo(str(result))
    sys.exit(STATUS_EXIT.get(result.status, FAILED))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log one line per chunk (INFO).")
@click.version_option(md.__version__, prog_name="mapperdsl")
def cli(verbose: bool) -> None:
    """Load database tables into SCD1/SCD2 dimension tables."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s")


@cli.command()
@click.argument("mapping")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write the plan as JSON to this file ('-' for standard output).")
def plan(mapping: str, json_path: str | None) -> None:
    """Print the plan of MAPPING (FILE[:NAME]); writes nothing to any database."""
    the_plan = _guard(lambda: load_mapping(mapping).plan())
    if json_path == "-":
        click.echo(the_plan.to_json())
        return
    click.echo(the_plan.explain())
    if json_path:
        Path(json_path).write_text(the_plan.to_json())
        click.echo(f"plan written to {json_path}", err=True)


@cli.command()
@click.argument("mapping", required=False)
@click.option("--plan", "plan_path", type=click.Path(exists=True, dir_okay=False),
              help="Run exactly this saved plan (from `mapperdsl plan --json`).")
@click.option("--jobs", type=int, default=None, help="Workers (joblib n_jobs).")
@click.option("--backend", default=None,
              help="joblib backend: loky (default), threading, dask, ray, ...")
@click.option("--scheduler", default=None,
              help="A dask scheduler to run the chunks on (tcp://host:8786); implies dask.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def run(mapping: str | None, plan_path: str | None, jobs: int | None, backend: str | None,
        scheduler: str | None, quiet: bool, as_json: bool) -> None:
    """Run MAPPING (FILE[:NAME]) now, or a saved --plan."""
    if (mapping is None) == (plan_path is None):
        _fail(WRONG, "give a MAPPING (FILE[:NAME]) or --plan plan.json, exactly one")

    def go() -> md.JobResult:
        how: dict[str, Any] = {"n_jobs": jobs, "progress": False if quiet else None,
                               "backend": backend, "scheduler": scheduler}
        if plan_path:
            return md.run(md.Plan.from_json(Path(plan_path).read_text()), **how)
        return load_mapping(mapping or "").run(**how)

    _finish(_guard(go), as_json)


@cli.command()
@click.argument("mapping")
@click.option("--chunk", "chunk_numbers", type=int, multiple=True,
              help="Preview this chunk number (repeatable; default all).")
@click.option("--limit", type=int, default=5, show_default=True, help="Sample rows per kind.")
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
def preview(mapping: str, chunk_numbers: tuple[int, ...], limit: int, as_json: bool) -> None:
    """Show what a run of MAPPING would change, per chunk; writes nothing."""
    def go() -> md.Preview:
        return load_mapping(mapping).plan().preview(chunks=chunk_numbers or None, limit=limit)

    try:
        result = _guard(go)
    except ValueError as exc:
        _fail(WRONG, str(exc))
    if as_json:
        click.echo(json.dumps({"counts": result.counts(), "chunks": [
            {"chunk": p.number, "range": p.key_range, "counts": p.counts}
            for p in result.chunks]}))
    else:
        click.echo(str(result))


@cli.command()
@click.argument("what")
@click.option("--target", "target_url", help="Target URL (when WHAT is a job id).")
@click.option("--jobs", type=int, default=None, help="Workers (joblib n_jobs).")
@click.option("--backend", default=None, help="joblib backend, as for run.")
@click.option("--scheduler", default=None, help="A dask scheduler, as for run.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def resume(what: str, target_url: str | None, jobs: int | None, backend: str | None,
           scheduler: str | None, quiet: bool, as_json: bool) -> None:
    """Finish an unfinished job: WHAT is a mapping FILE[:NAME] or a job id with --target."""
    how: dict[str, Any] = {"n_jobs": jobs, "progress": False if quiet else None,
                           "backend": backend, "scheduler": scheduler}
    if target_url:
        _finish(_guard(lambda: md.resume(what, target_url, **how)), as_json)
    _finish(_guard(lambda: load_mapping(what).resume(**how)), as_json)


@cli.command()
@click.argument("what")
@click.option("--target", "target_url", help="Target URL (when WHAT is a job id).")
def abandon(what: str, target_url: str | None) -> None:
    """Give up an unfinished job: WHAT is a mapping FILE[:NAME] (its latest) or a job id
    with --target. Its applied chunks stay; the checkpoint does not move."""
    if target_url:
        _guard(lambda: md.abandon(what, target_url))
        job_id = what
    else:
        job_id = _guard(lambda: load_mapping(what).abandon())
    click.echo(f"job {job_id} abandoned")


@cli.command()
@click.argument("job_id")
@click.option("--target", "target_url", required=True, help="Target URL of the job.")
def stop(job_id: str, target_url: str) -> None:
    """Ask running job JOB_ID to stop between chunks."""
    _guard(lambda: md.request_stop(job_id, target_url))
    click.echo(f"stop requested for job {job_id}")


@cli.command()
@click.argument("job_id", required=False)
@click.option("--target", "target_url", required=True, help="Target URL of the job log.")
@click.option("--json", "as_json", is_flag=True, help="Print rows as JSON.")
def status(job_id: str | None, target_url: str, as_json: bool) -> None:
    """The latest jobs, or one job's chunks."""
    frame = _guard(lambda: md.chunks(job_id, target_url) if job_id
                   else md.history(target_url, limit=10))
    _frame_out(frame, as_json)


@cli.command()
@click.option("--target", "target_url", required=True, help="Target URL of the job log.")
@click.option("--mapping", default=None, help="Only jobs of this mapping name.")
@click.option("--limit", type=int, default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print rows as JSON.")
def history(target_url: str, mapping: str | None, limit: int, as_json: bool) -> None:
    """The job log, newest first."""
    _frame_out(_guard(lambda: md.history(target_url, mapping, limit=limit)), as_json)


@cli.command()
@click.argument("job_id")
@click.option("--target", "target_url", required=True, help="Target URL of the job log.")
@click.option("--json", "as_json", is_flag=True, help="Print rows as JSON.")
def rejects(job_id: str, target_url: str, as_json: bool) -> None:
    """The rows job JOB_ID rejected, with the reason for each."""
    _frame_out(_guard(lambda: md.rejects(job_id, target_url)), as_json)


def main() -> None:
    if os.getcwd() not in sys.path:  # modules of the working folder import, as `python -m`
        sys.path.insert(0, os.getcwd())  # lets them (a saved plan's Python checkpoint, say)
    cli(prog_name="mapperdsl")

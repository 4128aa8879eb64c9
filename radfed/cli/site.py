"""The site administrator's commands: everything done at a hospital, on its own folder (``--site DIR``).

  radfed site check --site DIR         can the site take part, which cases need a fix (seconds, no extraction)
  radfed site extract --site DIR       check and extract every case (cached)
  radfed site plan show|diff ...       what a run would compute and send; what changed between two plans
  radfed site approve|revoke HASH --site DIR   approve a run plan, or withdraw the approval
  radfed site approvals --site DIR     every plan approved or revoked here, when and by whom
  radfed site outbox --site DIR        everything the site has sent
  radfed site join POOLED --site DIR   harmonise a late-joining site against a run's pooled ComBat estimates
  radfed predict --model M --site DIR ...   HGG vs BM for a new case, computed at the site (offline)

The work is done in client/ (sitecheck, extract, approvals, join, predict); this module (and ``site_plans`` for
the plan and approval commands) holds the parsers and turns results into text or, with ``--json``, one JSON
document. Heavy imports (numpy, torch, pyradiomics) stay
inside the commands so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from radfed.cli.options import add_json, add_output, add_profile, add_site, add_workers, print_json
from radfed.cli.site_plans import add_plan_commands

if TYPE_CHECKING:
    from common.profile import Profile


def site_profile(site_dir: str, profile_name: str | None) -> Profile:
    """The profile named on the command line, else the site.yaml's, else ``default``."""
    from client.site import site_settings
    from common.profile import load_profile

    return load_profile(profile_name or site_settings(site_dir).get("profile") or "default")


def cmd_check(args: argparse.Namespace) -> int:
    from rich.console import Console

    from client.sitecheck import check_site, render, write_report

    check = check_site(args.site, args.profile, args.min_cases_per_class, args.test_fraction)
    report = write_report(check, Path(args.output).expanduser() if args.output else None)
    if args.json:  # the report exactly as written
        print_json(json.loads(report.read_text(encoding="utf-8")))
        return check.exit_code
    console = Console()
    render(check, console)
    console.print(f"report: {report}", soft_wrap=True)
    return check.exit_code


def _extract_perturbed(site: Any, profile: Any, case_ids: list[str], console: Any) -> dict[str, object]:
    """The profile's perturbed copies of every usable case (the robustness filter's), into the site's cache, so a
    run with robustness-min-icc > 0 only reads them; returns how many were extracted now and the seconds."""
    import time

    from client.robustness import perturbed_cache_file, perturbed_features
    from client.site import SiteError

    if profile.robustness is None:
        raise SiteError(f"profile {profile.name} declares no robustness perturbations: nothing to extract with "
                        "--perturbed (add a 'robustness' block to the profile)")
    before = sum(perturbed_cache_file(site, profile, c).exists() for c in case_ids)
    start = time.perf_counter()
    with console.status(f"extracting {site.name}: {len(profile.robustness.draws())} perturbed copies of "
                        f"{len(case_ids) - before} case(s)"):
        perturbed_features(site, profile, case_ids)
    seconds = time.perf_counter() - start
    extracted = sum(perturbed_cache_file(site, profile, c).exists() for c in case_ids) - before
    console.print(f"perturbed copies (robustness filter): {extracted} case(s) extracted now, {before} from the "
                  f"cache, {seconds:.1f}s", soft_wrap=True)
    return {"copies_per_case": len(profile.robustness.draws()), "extracted": extracted, "cached": before,
            "seconds": round(seconds, 3)}


def cmd_extract(args: argparse.Namespace) -> int:
    import logging

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Table

    from client.extract import extract_site, features_path
    from client.site import load_site

    # Failures are shown in the table below; without a handler Python would also print each one mid-bar.
    logging.getLogger("flwr.radfed.extract").addHandler(logging.NullHandler())
    profile = site_profile(args.site, args.profile)
    site = load_site(args.site, profile.sequences)
    console = Console(stderr=args.json)  # with --json, stdout holds the document alone
    # what is counted, named; the total is known before the first case finishes (the callback corrects it)
    columns = (TextColumn(f"extracting {site.name}: cases"), BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("extract", total=len(site.cases))

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        table, summary = extract_site(site, profile, workers=args.workers, progress=progress)
    perturbed = _extract_perturbed(site, profile, table.case_ids, console) if args.perturbed else None
    csv_path = features_path(site, profile)
    files = {"features": csv_path, "provenance": csv_path.with_suffix(".json"), "log": site.files.extraction_log,
             "errors": site.files.errors}
    code = 0 if table.case_ids else 1
    if args.json:
        print_json({"site": site.name, "profile": {"name": profile.name, "sha256": profile.sha256},
                    "usable_cases": len(table.case_ids), "extracted": summary.extracted, "cached": summary.cached,
                    "seconds": round(summary.seconds, 3), "problems": [p.as_dict() for p in table.problems],
                    **({"perturbed": perturbed} if perturbed is not None else {}),
                    "files": {k: str(v) for k, v in files.items()}})
        return code
    per_case = f", {summary.seconds_per_extracted_case:.2f}s per case" if summary.extracted else ""
    console.print(f"site {site.name}: {len(table.case_ids)} usable case(s), {summary.extracted} extracted now, "
                  f"{summary.cached} from the cache, {len(table.problems)} problem(s), "
                  f"{summary.seconds:.1f}s{per_case}", soft_wrap=True)
    if table.problems:
        problems = Table(title="cases not used", title_justify="left")
        for column in ("case", "problem", "fix"):
            problems.add_column(column)
        for p in table.problems:
            problems.add_row(p.case_id, p.reason, p.fix)
        console.print(problems)
    console.print("\n".join(f"{name:<11} {path}" for name, path in files.items()), soft_wrap=True)
    return code


def cmd_outbox(args: argparse.Namespace) -> int:
    """Without --run: one line per run (messages, types, bytes, the fewest cases a statistic covered). With --run:
    that run's messages; exit 1 when the outbox holds none of it."""
    from client import outbox as box
    from client.site import site_files

    path = site_files(args.site).outbox
    entries = box.read(path)
    runs = box.summary(entries)
    if args.run:
        chosen = [e for e in entries if str(e["run_id"]) == args.run]
        if not chosen:
            known = ", ".join(r["run_id"] for r in runs) or "none"
            message = f"run {args.run}: this site sent nothing in it (runs in {path}: {known})"
            if args.json:
                print_json({"outbox": str(path), "run": args.run, "messages": [], "error": message})
            else:
                print(message, file=sys.stderr)
            return 1
        if args.json:
            print_json({"outbox": str(path), "run": args.run, "messages": chosen})
            return 0
        for entry in chosen:
            parts = []
            for record, values in entry["records"].items():
                for key, value in values.items():
                    shown = f"array{tuple(value['shape'])}" if isinstance(value, dict) and "shape" in value else value
                    parts.append(f"{record}.{key}={shown}")
            fold = f" [{entry['fold']}]" if entry.get("fold") else ""
            print(f"{entry['time']} {entry['type']}{fold}: " + ", ".join(parts))
        return 0
    if args.json:
        print_json({"outbox": str(path), "runs": runs, "messages": entries})
        return 0
    if not entries:
        print(f"{path} does not exist or is empty: this site has sent nothing yet")
        return 0
    print(f"{len(entries)} message(s) in {len(runs)} run(s), from {path} (one run's messages: --run RUN_ID):")
    for r in runs:
        types = ", ".join(f"{n} {t}" for t, n in sorted(r["types"].items()))
        fewest = f"every statistic over >= {r['fewest_cases']} cases" if r["fewest_cases"] is not None \
            else "counts from the manifest only"
        print(f"  run {r['run_id']}  {r['first']} .. {r['last']}: {r['messages']} message(s), "
              f"{r['array_bytes']:,} bytes of arrays; {fewest}\n    {types}")
    return 0


def cmd_join(args: argparse.Namespace) -> int:
    from client.join import join

    result = join(Path(args.pooled), Path(args.site), args.workers)
    if args.json:
        print_json(result)
        return 0
    for problem in result["left_out"]:
        print(f"left out {problem}")
    print(f"site {result['site']} harmonised against run {result['run_id']} on its {result['cases']} usable cases "
          f"({result['features']} features); parameters kept in {result['path']} (nothing left the site). "
          f"Predict with: radfed predict --model {Path(args.pooled).resolve().parent / 'model.pt'} --site "
          f"{args.site} --case-id ID")
    return 0


def _image_arg(text: str) -> tuple[str, Path]:
    seq, sep, path = text.partition("=")
    if not sep or not seq.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"expected SEQ=PATH (e.g. t1c=scans/p1_t1c.nii.gz), got {text!r}")
    return seq.strip(), Path(path.strip())


def _covariate_arg(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE (e.g. age=63 or sex=F), got {text!r}")
    return name.strip(), value.strip()


def cmd_predict(args: argparse.Namespace) -> int:
    """Exit codes: 0 scored; 1 the case cannot be scored; 2 refused (``client.predict_refusals``)."""
    from client.predict import (
        EXIT_BAD_CASE,
        EXIT_OK,
        SCHEMA,
        PredictRefusal,
        offline,
        predict,
        prediction_json,
        render_text,
    )

    images: dict[str, Path] = {}
    try:
        for seq, path in args.image or []:
            if seq in images:
                raise PredictRefusal(f"--image {seq}= given twice", f"give one --image {seq}=PATH")
            images[seq] = path
        with offline():
            pred = predict(args.model, args.site, case_id=args.case_id, images=images,
                           mask=Path(args.mask) if args.mask else None, case_name=args.case_name,
                           run_id=args.run_id,
                           harmonization_file=Path(args.harmonization) if args.harmonization else None,
                           no_harmonization=args.no_harmonization, covariates=dict(args.covariate or []))
    except PredictRefusal as exc:
        if args.json:
            print_json({"schema": SCHEMA, "status": exc.status, "exit_code": exc.exit_code, "case": exc.case_id,
                        "reason": exc.reason, "fix": exc.fix, "offline": True, "sent": "nothing"})
        else:
            word = "cannot score the case" if exc.exit_code == EXIT_BAD_CASE else "refused"
            print(f"radfed predict: {word}: {exc.reason}\n  fix: {exc.fix}", file=sys.stderr)
        return exc.exit_code
    if args.json:
        print_json(prediction_json(pred, args.top))
    else:
        print(render_text(pred, args.top))
    return EXIT_OK


PREDICT_DESCRIPTION = """\
Score one case with a run's global model, at the site: extraction with the federation's profile, the site's own \
ComBat parameters of that run, the model's standardisation. Prints the probability of HGG vs BM, the features \
that drove it, and the model's and profile's hashes. Nothing leaves the site.

  radfed predict --model RUN/model.pt --site DIR --case-id ID
  radfed predict --model RUN/model.pt --site DIR --image t1c=T1C --image flair=FLAIR --image adc=ADC --mask MASK

The mask uses the site's label numbering (site.yaml 'label_map' applies).
Exit codes: 0 probability computed; 1 the case cannot be scored (bad input or a non-finite feature; the message \
names the case and the fix); 2 refused or wrong usage (profile or protocol differs from the model's, \
harmonisation parameters missing, ambiguous or for other features, unreadable model)."""


def add_predict(sub: Any) -> None:
    p = sub.add_parser("predict", help="site administrator: the global model's probability of HGG vs BM for one "
                       "case (offline)", description=PREDICT_DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="PATH", help="the run's model.pt")
    add_site(p, text="the site folder (its site.yaml, profile, output_dir)")
    p.add_argument("--case-id", default=None, help="a case of the site's manifest (or BraTS/DICOM folders)")
    p.add_argument("--image", action="append", type=_image_arg, default=[], metavar="SEQ=PATH",
                   help="one per profile sequence (default profile: t1c, flair, adc)")
    p.add_argument("--mask", default=None, metavar="PATH", help="the case's multi-label mask")
    p.add_argument("--case-name", default=None, help="a name for the case in messages (default: the mask's)")
    p.add_argument("--run-id", default=None,
                   help="the run that made the model (default: model.pt's, else its folder's <time>-run<id>)")
    p.add_argument("--harmonization", default=None, metavar="PATH",
                   help="this site's ComBat parameters (default <output_dir>/harmonization/run-<run id>.json)")
    p.add_argument("--no-harmonization", action="store_true",
                   help="the federation ran with harmonization=none: apply no ComBat")
    p.add_argument("--covariate", action="append", type=_covariate_arg, default=[], metavar="NAME=VALUE",
                   help="a covariate of the case (e.g. age=63, sex=F) when the run's ComBat adjusted for it or "
                        "its model takes it (model-covariates); a site case's manifest columns are used otherwise")
    p.add_argument("--top", type=int, default=5, help="how many driving features to show (default 5)")
    add_json(p)
    p.set_defaults(func=cmd_predict)


def add_site_commands(sub: Any) -> None:
    """``radfed site ...`` (and ``radfed predict``, the site's other command) on the root's subcommands."""
    site = sub.add_parser("site", help="site administrator commands").add_subparsers(
        dest="site_command", required=True, metavar="COMMAND")
    check = site.add_parser(
        "check", help="check every case of a site without extracting (seconds)",
        description="Check a site's configuration and every case (files, geometry, co-registration, masks, "
                    "diagnoses) and whether it has enough cases per class to take part. The JSON report goes to "
                    "<output_dir>/check.json (or --output). Exit code 0: usable cases remain (problems are "
                    "warnings); 1: no usable case; 3: too few cases to take part; 2: the site itself cannot be "
                    "read (e.g. a malformed site.yaml).")
    add_site(check)
    add_json(check)
    add_output(check, "where to write the JSON report (default <output_dir>/check.json)")
    add_profile(check)
    check.add_argument("--min-cases-per-class", type=int, default=None, metavar="K",
                       help="the federation's k (default 5; a site.yaml value can only raise it)")
    check.add_argument("--test-fraction", type=float, default=0.3, help="the federation's held-out fraction")
    check.set_defaults(func=cmd_check)

    extract = site.add_parser("extract", help="check and extract every case of a site (cached)")
    add_site(extract)
    add_json(extract)
    add_profile(extract)
    add_workers(extract)
    extract.add_argument("--perturbed", action="store_true",
                         help="also extract the profile's perturbed copies of every usable case (the robustness "
                              "filter's, robustness-min-icc > 0), so a run only reads them from the cache")
    extract.set_defaults(func=cmd_extract)

    add_plan_commands(site)

    outbox = site.add_parser("outbox", help="what this site has sent: a summary per run, or one run's messages "
                             "(values as sent, arrays as shapes)")
    add_site(outbox)
    outbox.add_argument("--run", default=None, metavar="RUN_ID", help="only this run")
    add_json(outbox)
    outbox.set_defaults(func=cmd_outbox)

    join = site.add_parser("join", help="harmonise this site against a finished run's pooled ComBat estimates "
                           "(late joiner)")
    join.add_argument("pooled", metavar="POOLED", help="the run folder's harmonization.json")
    add_site(join)
    add_workers(join, default=1)
    add_json(join)
    join.set_defaults(func=cmd_join)

    add_predict(sub)

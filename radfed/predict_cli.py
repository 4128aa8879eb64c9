"""The `radfed predict` command line: its options, and the exit code and message of each outcome.

The work is ``client.predict.predict``, run inside ``client.predict.offline`` (no network connection can be
opened). The result is printed as text or, with ``--json``, as ``radfed.prediction/1``; a refusal as its
reason and fix (or as JSON), with exit code 1 (the case cannot be scored) or 2 (refused or wrong usage).
Only argparse and the light part of radfed are imported here: torch and pyradiomics load when a case is
scored, so ``radfed --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

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


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``radfed predict`` to the CLI's subcommands."""
    parser = subparsers.add_parser(
        "predict", help="site administrator: the global model's probability of HGG vs BM for one case (offline)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Score one case with a run's global model, at the site: extraction with the federation's profile, the "
            "site's own ComBat parameters of that run, the model's standardisation. Prints the probability of HGG "
            "vs BM, the features that drove it, and the model's and profile's hashes. Nothing leaves the site.\n\n"
            "  radfed predict --model RUN/model.pt --site SITE_DIR --case-id ID\n"
            "  radfed predict --model RUN/model.pt --site SITE_DIR --image t1c=T1C --image flair=FLAIR "
            "--image adc=ADC --mask MASK\n\n"
            "The mask uses the site's label numbering (site.yaml 'label_map' applies).\n"
            "Exit codes: 0 probability computed; 1 the case cannot be scored (bad input or a non-finite "
            "feature; the message names the case and the fix); 2 refused or wrong usage (profile or protocol "
            "differs from the model's, harmonisation parameters missing, ambiguous or for other features, "
            "unreadable model)."))
    parser.add_argument("--model", required=True, help="the run's model.pt")
    parser.add_argument("--site", required=True, help="the site folder (its site.yaml, profile, output_dir)")
    parser.add_argument("--case-id", default=None, help="a case of the site's manifest (or BraTS/DICOM folders)")
    parser.add_argument("--image", action="append", type=_image_arg, default=[], metavar="SEQ=PATH",
                        help="one per profile sequence (default profile: t1c, flair, adc)")
    parser.add_argument("--mask", default=None, help="the case's multi-label mask")
    parser.add_argument("--case-name", default=None, help="a name for the case in messages (default: the mask's)")
    parser.add_argument("--run-id", default=None,
                        help="the run that made the model (default: model.pt's, else its folder's <time>-run<id>)")
    parser.add_argument("--harmonization", default=None, metavar="FILE",
                        help="this site's ComBat parameters (default <output_dir>/harmonization/run-<run id>.json)")
    parser.add_argument("--no-harmonization", action="store_true",
                        help="the federation ran with harmonization=none: apply no ComBat")
    parser.add_argument("--covariate", action="append", type=_covariate_arg, default=[], metavar="NAME=VALUE",
                        help="a ComBat covariate of the case (e.g. age=63, sex=F) when the run adjusted for any; "
                             "a site case's manifest columns are used otherwise")
    parser.add_argument("--top", type=int, default=5, help="how many driving features to show (default 5)")
    parser.add_argument("--json", action="store_true", help="print the result (or the refusal) as JSON")
    parser.set_defaults(func=main)
    return parser


def main(args: argparse.Namespace) -> int:
    """Run ``radfed predict``; returns the exit code (see the module doc)."""
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
            print(json.dumps({"schema": SCHEMA, "status": exc.status, "exit_code": exc.exit_code,
                              "case": exc.case_id, "reason": exc.reason, "fix": exc.fix, "offline": True,
                              "sent": "nothing"}, indent=2))
        else:
            word = "cannot score the case" if exc.exit_code == EXIT_BAD_CASE else "refused"
            print(f"radfed predict: {word}: {exc.reason}\n  fix: {exc.fix}", file=sys.stderr)
        return exc.exit_code
    if args.json:
        print(json.dumps(prediction_json(pred, args.top), indent=2))
    else:
        print(render_text(pred, args.top))
    return EXIT_OK

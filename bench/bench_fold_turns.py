"""The folds' coordinator alone, in process: N leave-one-site-out folds over N sites through ``server.folds.run_folds``.

    python bench/bench_fold_turns.py [--sites 48] [--repeat 3]

Each fold asks its N - 1 sites one moments-like query (the ~860 agreed names, per-site ComBat rows and the shared
estimates) and four Newton-like rounds, pools the replies and writes an audit entry per round, as the real folds do;
the "sites" are a grid in this process that splits each ``query.batch`` and answers every sub-request with a fixed
reply (bench/bench_loso.py runs the real thing). Prints the ``folds-end`` entry's wall and CPU seconds by step (the
fold threads' turns, packing, unpacking) and the coordinator's CPU without the fake sites': the per-sub-request cost
of the coordinator's own side (building requests, packing, unpacking, reading replies), without Ray, the sites or
Flower's delivery. Compare two checkouts by running it from each, interleaved.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import tomllib
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from client.steps import run_config  # noqa: E402
from common import batch  # noqa: E402
from common.canon import sha256_json  # noqa: E402
from common.npy import decode, encode  # noqa: E402
from server.audit import AuditLog  # noqa: E402
from server.federation import Cohort, FeatureAgreement, Federation, Run  # noqa: E402
from server.folds import FoldJob, run_folds  # noqa: E402

NAMES = [f"original_feature_{i:04d}" for i in range(860)]
NEWTON_ROUNDS = 4
MOMENTS = RecordDict({"arrays": ArrayRecord({k: encode(np.ones(len(NAMES))) for k in
                                             ("mean", "m2", "mean-hgg", "m2-hgg", "mean-bm", "m2-bm")}),
                      "metrics": MetricRecord({"n": 10, "n-hgg": 5, "n-bm": 5})})
NEWTON = RecordDict({"arrays": ArrayRecord({"grad": encode(np.ones(4)), "hess": encode(np.eye(4))}),
                     "metrics": MetricRecord({"loss": 1.0, "n": 10, "n-hgg": 5, "n-bm": 5})})


def _answer(message_type: str) -> RecordDict:
    """A sub-reply's own records (as a site's handler makes them: new objects for every sub-request)."""
    like = MOMENTS if message_type == "query.moments" else NEWTON
    return RecordDict({"arrays": ArrayRecord({k: Array(dtype=a.dtype, shape=a.shape, stype=a.stype, data=bytes(a.data))
                                              for k, a in like["arrays"].items()}),
                       "metrics": MetricRecord(dict(like["metrics"].items()))})


class Sites:
    """Every site in this process: splits each batch and answers each sub-request with a fixed reply (its CPU is
    counted apart)."""

    def __init__(self, n: int) -> None:
        self.n, self.cpu = n, 0.0

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN201
        start = time.process_time()
        out = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as Flower's grid does when it pushes
            subs = batch.split(m)
            out.append(batch.join(m, [Message(_answer(s.metadata.message_type), reply_to=s) for s in subs]))
        self.cpu += time.process_time() - start
        return out

    def get_node_ids(self):  # noqa: ANN201
        return list(range(1, self.n + 1))


def fold(fed: Federation, held: str):  # noqa: ANN201
    def work(run: Run) -> str:
        others = {s for s in fed.sites.values() if s != held}
        cohort = Cohort(fed.subset(others), FeatureAgreement(NAMES, sha256_json(NAMES), 1.0, {}), fold=held)
        shared = {"grand-mean": encode(np.ones(len(NAMES))), "var-pooled": encode(np.ones(len(NAMES)))}

        def estimates(nid: int) -> RecordDict:
            return RecordDict({"arrays": ArrayRecord({"beta": encode(np.ones((1, len(NAMES)))), **shared}),
                               "config": ConfigRecord({"site-index": nid, "n-sites": len(others)})})

        replies = cohort.ask(run, "moments", "query.moments", {"features": NAMES, "features-sha256": "-"},
                             per_node=estimates)
        total = sum(decode(r.content["arrays"]["mean"]) for r in replies.values())
        run.audit.append("moments", n=len(replies), stats_sha256=sha256_json(total.tolist()[:4]))
        coef = np.zeros(4)
        for rnd in range(1, NEWTON_ROUNDS + 1):
            record = RecordDict({"arrays": ArrayRecord({"coef": Array(coef), "mean": Array(np.zeros(3)),
                                                        "scale": Array(np.ones(3))})})
            replies = cohort.ask(run, "newton", "query.newton", {"features": NAMES[:3], "server-round": rnd},
                                 per_node=lambda _, r=record: r, server_round=rnd)
            grad = sum(decode(r.content["arrays"]["grad"]) for r in replies.values())
            run.audit.append("newton-round", round=rnd, grad=grad.tolist())
        return held
    return work


def once(n: int, folder: Path) -> dict[str, object]:
    path = folder / "audit.jsonl"
    path.unlink(missing_ok=True)
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    sites = Sites(n)
    run = Run(grid=sites, config=run_config({**config, "fold-batching": True}),  # type: ignore[arg-type]
              audit=AuditLog(path, Ed25519PrivateKey.generate()), folder=folder, profile=None)  # type: ignore[arg-type]
    fed = Federation({i + 1: f"site-{i:02d}" for i in range(n)}, min_sites=1)
    start = time.process_time()
    run_folds(run, [FoldJob("leave-one-site-out", s, fold(fed, s)) for s in sorted(fed.sites.values())])
    coordinator = time.process_time() - start - sites.cpu
    end = json.loads(path.read_text().splitlines()[-1])["data"]
    return {"sub-requests": end["requests"], "coordinator CPU s": round(coordinator, 3),
            "us per sub-request": round(1e6 * coordinator / end["requests"]), "seconds": end["seconds"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sites", type=int, default=48)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.ERROR)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0  # Flower's Message needs them
    with tempfile.TemporaryDirectory(prefix="radfed-fold-turns-") as tmp:
        for _ in range(args.repeat):
            print(json.dumps(once(args.sites, Path(tmp))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

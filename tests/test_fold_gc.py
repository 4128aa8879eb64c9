"""While folds run together, the objects alive before them are out of the garbage collector's sight (``gc.freeze``):
a full collection in the ServerApp's process walked ~350,000 of them, holding the GIL, during the folds' turns; the
freeze is undone as the folds end, however they end (server/folds.py)."""

from __future__ import annotations

import gc
import tomllib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, RecordDict

from client.steps import run_config
from common import batch
from server.audit import AuditLog
from server.federation import Cohort, FeatureAgreement, Federation, Run
from server.folds import FoldJob, run_folds

pytestmark = pytest.mark.usefixtures("server_identity")  # tests/conftest.py
ROOT = Path(__file__).resolve().parent.parent


class Sites:
    """Every site answering every sub-request with an empty reply."""

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import Message

        out = []
        for i, m in enumerate(messages):
            m.metadata.__dict__["_message_id"] = f"batch-{i}"
            out.append(batch.join(m, [Message(RecordDict({"config": ConfigRecord({"ok": 1})}), reply_to=s)
                                      for s in batch.split(m)]))
        return out

    def get_node_ids(self):
        return [1, 2]


def _run(tmp_path: Path, fail: bool) -> list[int]:
    seen: list[int] = []
    fed = Federation({1: "site-a", 2: "site-b"}, min_sites=1)

    def work(run: Run) -> str:
        cohort = Cohort(fed.subset({"site-a", "site-b"}), FeatureAgreement(["f"], "-", 1.0, {}), fold="x")
        seen.append(gc.get_freeze_count())
        cohort.ask(run, "probe", "query.probe", {})
        seen.append(gc.get_freeze_count())
        if fail:
            raise RuntimeError("this fold broke")
        return "done"

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    run = Run(grid=Sites(), config=run_config({**config, "fold-batching": True}),  # type: ignore[arg-type]
              audit=AuditLog(tmp_path / "audit.jsonl", Ed25519PrivateKey.generate()), folder=tmp_path,
              profile=None)  # type: ignore[arg-type]
    try:
        run_folds(run, [FoldJob("leave-one-site-out", "x", work)])
    except RuntimeError:
        assert fail
    return seen


@pytest.mark.parametrize("fail", [False, True])
def test_the_objects_from_before_the_folds_are_frozen_while_they_run(tmp_path, fail):
    before = gc.get_freeze_count()
    seen = _run(tmp_path, fail)
    assert all(count > before for count in seen), seen
    assert gc.get_freeze_count() == before  # undone as the folds end (a fold's failure too)

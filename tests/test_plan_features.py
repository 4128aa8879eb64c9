"""The features request that rides with the plan query (merge-phases, client/planphase.py): a site answers it only
when the plan phase admits it, so a site the plan drops never sends its feature names. Real site folders, radfed's
ClientApp with all its mods, real Flower messages."""

from __future__ import annotations

import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict

from client.app import app
from common import protocol
from common.plan import plan_sha256, run_plan
from common.profile import load_profile
from radfed import synth
from radfed.cli import approve_demo_plan
from radfed.launch import app_run_config


def _ask(ctx: Context, message_type: str, config: dict, message_id: str) -> Message:
    meta = Metadata(run_id=1, message_id=message_id, src_node_id=0, dst_node_id=7, reply_to_message_id="",
                    group_id="1", created_at=time.time(), ttl=3600.0, message_type=message_type)
    return app(Message(RecordDict({"config": ConfigRecord(config)}), metadata=meta), ctx)


def _sent_types(site: Path) -> list[str]:
    outbox = site / ".radfed" / "outbox.jsonl"
    return [json.loads(line)["type"] for line in outbox.read_text(encoding="utf-8").splitlines()] \
        if outbox.exists() else []


def _site(tmp_path: Path, per_class: int, k: int) -> tuple[Path, dict, str]:
    site = synth.write_site(tmp_path / "sites", synth.tiny_sites(1, per_class)[0], seed=11)
    config = app_run_config({"data-root": str(site.parent), "min-cases-per-class": k})
    approve_demo_plan([site], config)
    return site, config, plan_sha256(run_plan(config, load_profile()))


def _named(plan_hash: str) -> dict:
    return {"protocol": protocol.PROTOCOL_VERSION, "profile-sha256": load_profile().sha256, "plan-sha256": plan_hash}


def test_an_admitted_site_answers_the_features_request_naming_the_plan(tmp_path):
    site, config, plan_hash = _site(tmp_path, 12, 5)
    ctx = Context(run_id=1, node_id=7, node_config={"site-dir": str(site)}, state=RecordDict(), run_config=config)
    plain = _ask(ctx, protocol.FEATURES, {}, "f0")
    named = _ask(ctx, protocol.FEATURES, _named(plan_hash), "f1")
    assert not named.has_error(), named.error.reason if named.has_error() else ''
    assert list(named.content["config"]["features"]) == list(plain.content["config"]["features"])


def test_a_site_the_plan_drops_sends_no_feature_names(tmp_path):
    # another plan than the site computed (other code or config at the coordinator): dropped at the plan phase
    site, config, plan_hash = _site(tmp_path / "a", 12, 5)
    ctx = Context(run_id=1, node_id=7, node_config={"site-dir": str(site)}, state=RecordDict(), run_config=config)
    other = _ask(ctx, protocol.FEATURES, _named("0" * 64), "f")
    assert other.has_error() and "plan-sha256 differs" in str(other.error.reason)
    wrong_profile = _ask(ctx, protocol.FEATURES, {**_named(plan_hash), "profile-sha256": "1" * 64}, "g")
    assert wrong_profile.has_error() and "profile-sha256 differs" in str(wrong_profile.error.reason)
    assert protocol.FEATURES not in _sent_types(site)

    # too few cases for k = 10 (each class needs two release blocks): the plan reply says ineligible, and the
    # features request riding with it is refused for the same reason
    site, config, plan_hash = _site(tmp_path / "b", 12, 10)
    ctx = Context(run_id=1, node_id=7, node_config={"site-dir": str(site)}, state=RecordDict(), run_config=config)
    plan = _ask(ctx, protocol.PLAN, _named(plan_hash), "p")
    assert str(plan.content["config"]["status"]) == "ineligible"
    refused = _ask(ctx, protocol.FEATURES, _named(plan_hash), "f")
    assert refused.has_error() and str(plan.content["config"]["reason"]) in str(refused.error.reason)
    assert _sent_types(site) == [protocol.PLAN]

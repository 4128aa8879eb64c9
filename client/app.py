"""radfed ClientApp: one hospital's side of a run. Flower glue only; the work is in client.steps.

Every reply passes the privacy guard (client.guard) before it leaves the site.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import steps
from client.guard import SITE_STATE, privacy_guard
from client.site import SiteError

log = logging.getLogger("flwr.radfed.client")
app = ClientApp(mods=[privacy_guard])


def _site_dir(context: Context) -> Path:
    return steps.locate_site(context.node_config, context.run_config)


def _agreed_features(context: Context, msg: Message) -> list[str]:
    """The feature list agreed in the moments phase, checked against the hash the server sends."""
    record = context.state.get(SITE_STATE)
    if not isinstance(record, ConfigRecord) or "features" not in record:
        raise SiteError("this site holds no agreed feature list for the run (it missed the moments phase); "
                        "restart the run")
    names = list(record["features"])  # type: ignore[arg-type]
    expected = str(msg.content["config"].get("features-sha256", ""))
    if expected and expected != record["features-sha256"]:
        raise SiteError("the server's feature list differs from the one this site agreed to; restart the run")
    return names


@app.query("plan")
def plan(msg: Message, context: Context) -> Message:
    config, counts = steps.plan_reply(_site_dir(context), context.run_config)
    return Message(RecordDict({"config": ConfigRecord(config), "metrics": MetricRecord(counts)}), reply_to=msg)


@app.query("features")
def features(msg: Message, context: Context) -> Message:
    data = steps.load_site_data(_site_dir(context), context.run_config)
    names, counts = steps.features_reply(data)
    return Message(RecordDict({"config": ConfigRecord({"features": names}), "metrics": MetricRecord(counts)}),
                   reply_to=msg)


@app.query("moments")
def moments(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    names = [str(n) for n in config["features"]]  # type: ignore[union-attr]
    context.state[SITE_STATE] = ConfigRecord({"features": names,
                                              "features-sha256": str(config["features-sha256"])})
    data = steps.load_site_data(_site_dir(context), context.run_config)
    n, mean, m2 = steps.moments_reply(data, names)
    return Message(RecordDict({"arrays": ArrayRecord({"mean": _arr(mean), "m2": _arr(m2)}),
                               "metrics": MetricRecord({"n": n})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    names = _agreed_features(context, msg)
    data = steps.load_site_data(_site_dir(context), context.run_config)
    state = msg.content["arrays"].to_torch_state_dict()  # type: ignore[union-attr]
    new_state, train_metrics = steps.train_step(data, names, state, msg.content["config"])  # type: ignore[arg-type]
    return Message(RecordDict({"arrays": ArrayRecord(new_state), "metrics": MetricRecord(train_metrics)}),
                   reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    names = _agreed_features(context, msg)
    data = steps.load_site_data(_site_dir(context), context.run_config)
    state = msg.content["arrays"].to_torch_state_dict()  # type: ignore[union-attr]
    result = steps.evaluate_step(data, names, state, float(msg.content["config"]["pos-weight"]))  # type: ignore[arg-type]
    return Message(RecordDict({"metrics": MetricRecord(result)}), reply_to=msg)


def _arr(values: np.ndarray) -> Array:
    return Array(np.ascontiguousarray(values, dtype=np.float64))

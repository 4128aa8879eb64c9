"""FedAvg restricted to the run's admitted sites, with every round written to the audit log."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result

from common import curves, dp, metrics, npy
from common.canon import arrays_sha256
from server import clinical
from server.audit import AuditLog
from server.federation import Federation, failure_reason, require_link

log = logging.getLogger("flwr.radfed.server")

def record_sha256(record: ArrayRecord) -> str:
    return arrays_sha256(npy.decode_all(record))


def weighted_mean(updates: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    """Flower's FedAvg mean (``aggregate_arrayrecords``), the same operations in the same order, so the same bits:
    each update times its share of the total weight, summed in place in the given order. Shapes as the updates'."""
    total = sum(weights)
    mean: dict[str, np.ndarray] = {}
    for update, weight in zip(updates, [w / total for w in weights], strict=True):
        for key, value in update.items():
            if key not in mean:
                mean[key] = value * weight
            else:
                mean[key] += value * weight
    return mean


def evaluation_records(sites: dict[int, str], replies: Iterable[Message]) -> tuple[
        dict[str, dict[str, float]], dict[str, dict[str, object]]]:
    """Per site: counts, AUC (+ DeLong variance), loss and rates; and its ROC and calibration curves."""
    per_site: dict[str, dict[str, float]] = {}
    site_curves: dict[str, dict[str, object]] = {}
    for m in replies:
        rec, name = m.content["metrics"], sites[m.metadata.src_node_id]
        values = {"n": int(rec["num-examples"]),  # type: ignore[arg-type]
                  **{k: int(rec[k]) for k in metrics.COUNT_KEYS},  # type: ignore[arg-type]
                  "auc": float(rec["auc"]), "auc_var": float(rec["auc-var"]),  # type: ignore[arg-type]
                  "loss": float(rec["loss"])}  # type: ignore[arg-type]
        if "sse" in rec:  # the Brier score's numerator (the families' comparison table)
            values["sse"] = float(rec["sse"])  # type: ignore[arg-type]
        values.update(metrics.rates(values))
        per_site[name] = values
        if "arrays" in m.content:
            arrays = m.content["arrays"]
            fpr, tpr = curves.roc_curve(arrays["roc"].numpy())  # type: ignore[union-attr]
            site_curves[name] = {"roc": {"fpr": fpr, "tpr": tpr},
                                 "calibration": curves.calibration_curve(arrays["calibration"].numpy())}  # type: ignore[union-attr]
    return per_site, site_curves


class AuditedFedAvg(FedAvg):
    """FedAvg over the federation's admitted sites only; a site that fails a round is dropped,
    recorded as a dropout, and the run stops cleanly if fewer than ``min_sites`` remain.

    ``site_evaluations[round][site]`` keeps each site's held-out counts and AUC;
    ``site_training[round][site]`` its case count and loss.
    """

    def __init__(self, fed: Federation, audit: AuditLog, fold: str = "", evaluate_rounds: bool = True,
                 dp_account: dp.DPAccount | None = None, evaluate_every: int = 0, family: str = "",
                 **kwargs: object) -> None:
        n = len(fed.sites)
        super().__init__(min_train_nodes=n, min_evaluate_nodes=n, min_available_nodes=n, **kwargs)  # type: ignore[arg-type]
        self.fed = fed
        self.sites = fed.sites  # shared: a dropout here is a dropout of the federation
        self.audit = audit
        self.fold = fold  # "" for the main federation; the held-out site's name in a leave-one-site-out fold
        self.evaluate_rounds = evaluate_rounds
        # the sites evaluate after the last round only (one message each, what the results need), and after every
        # evaluate_every-th round when a training curve is asked for (run config evaluate-every > 0)
        self.evaluate_every = evaluate_every
        self.num_rounds = 0
        self.family = family  # named in the audit entries when the run fits several families
        self.dp_account = dp_account  # spends privacy budget for every noised update that arrived
        self.site_training: dict[int, dict[str, dict[str, float]]] = {}
        self.site_evaluations: dict[int, dict[str, dict[str, float]]] = {}
        self.site_curves: dict[int, dict[str, dict[str, object]]] = {}
        self.site_terms: dict[int, dict[str, clinical.Terms]] = {}  # the pooled clinical metrics' terms

    def _messages(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                  message_type: str) -> Iterable[Message]:
        config["server-round"] = server_round
        if self.fold:
            config["fold"] = self.fold
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        # kept: the grid stamps each with its message id when it sends them (see _site_of)
        self._sent = list(self._construct_messages(record, list(self.sites), message_type))
        return self._sent

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, **kwargs: object) -> Result:  # type: ignore[override]
        self.num_rounds = num_rounds
        return super().start(grid, initial_arrays, num_rounds=num_rounds, **kwargs)  # type: ignore[arg-type]

    def evaluates(self, server_round: int) -> bool:
        """Whether the sites evaluate the model of this round: the last round's, and every evaluate-every-th."""
        if not self.evaluate_rounds:
            return False
        return server_round == self.num_rounds or (self.evaluate_every > 0 and server_round % self.evaluate_every == 0)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self._messages(server_round, arrays, config, MessageType.TRAIN)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if not self.evaluates(server_round):
            return []
        return self._messages(server_round, arrays, config, MessageType.EVALUATE)

    def _site_of(self, reply: Message, sent: dict[str, int]) -> int:
        """The site a reply stands for. When a site's SuperNode goes offline (stopped, crashed, lost its
        network: no heartbeat for 2 x 30 s), Flower 1.42's SuperLink answers in its place with an error
        reply ("Node Unavailable") whose sender is the SuperLink itself (node id 1), not the site; the
        same for an expired reply. So find the site by the message the reply answers."""
        return sent.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    def _drop_failures(self, server_round: int, phase: str, replies: list[Message]) -> list[Message]:
        # the message each reply answers, by id: built once per round (once per reply was sites^2 per round)
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in getattr(self, "_sent", [])}
        by_site = [(self._site_of(m, sent), m) for m in replies]
        require_link(self.fed, dict(by_site), f"round {server_round} ({phase})")
        answered = {node_id for node_id, _ in by_site}
        good = []
        for node_id, msg in by_site:
            if not msg.has_error():
                good.append(msg)
            elif node_id in self.sites:
                self.fed.drop(self.audit, node_id, phase, failure_reason(msg), server_round)
        for node_id in [n for n in self.sites if n not in answered]:
            self.fed.drop(self.audit, node_id, phase, "no reply before the timeout", server_round)
        self.fed.require_enough(f"round {server_round} ({phase})")
        return good

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if self.dp_account is not None:  # an update that arrived is spent, even if the round fails later
            self.dp_account.add_round([self.sites[m.metadata.src_node_id] for m in replies
                                       if not m.has_error() and m.metadata.src_node_id in self.sites])
        good = self._drop_failures(server_round, "train", replies)
        # in site-name order, not arrival order: a weighted mean summed in another order differs in the last bits,
        # so the same data would not give a bit-identical model run to run
        good.sort(key=lambda m: (self.sites.get(m.metadata.src_node_id, ""), m.metadata.src_node_id))
        # FedAvg's aggregate_train, with each update decoded once (common.npy) for both the mean and its hash:
        # Flower's np.load per array twice was most of the coordinator's ~50 ms between rounds at 16 sites
        good, _ = self._check_and_log_replies(good, is_train=True)  # Flower's own consistency checks
        updates = [npy.decode_all(m.content["arrays"]) for m in good]  # type: ignore[arg-type]
        arrays = agg = mean = None
        if good:
            weights = [next(iter(m.content.metric_records.values()))[self.weighted_by_key] for m in good]
            mean = {k: np.asarray(v) for k, v in weighted_mean(updates, weights).items()}  # type: ignore[arg-type]
            arrays = ArrayRecord({k: npy.encode(v) for k, v in mean.items()})
            agg = self.train_metrics_aggr_fn([m.content for m in good], self.weighted_by_key)
        per_site = {self.sites[m.metadata.src_node_id]: {
            "n": int(m.content["metrics"]["num-examples"]),  # type: ignore[arg-type]
            "loss": float(m.content["metrics"]["train-loss"]),  # type: ignore[arg-type]
            "update_sha256": arrays_sha256(update),
        } for m, update in zip(good, updates, strict=True)}
        self.site_training[server_round] = per_site
        self.audit.append("round-train", round=server_round, sites=per_site, **self._tag(),
                          aggregated_sha256=arrays_sha256(mean) if mean is not None else None)
        return arrays, agg

    def _tag(self) -> dict[str, str]:
        return {**({"fold": self.fold} if self.fold else {}), **({"family": self.family} if self.family else {})}

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        if not self.evaluates(server_round):
            return None
        good = self._drop_failures(server_round, "evaluate", list(replies))
        per_site, site_curves = evaluation_records(self.sites, good)
        self.site_evaluations[server_round] = per_site
        self.site_curves[server_round] = site_curves
        self.site_terms[server_round] = clinical.terms_of(self.sites, good)
        combined = metrics.combine_sites(list(per_site.values()))
        self.audit.append("round-evaluate", round=server_round, sites=per_site, aggregate=combined, **self._tag())
        log.info("Round %d: held-out AUC %.3f, sensitivity %.3f, specificity %.3f over %d cases at %d sites",
                 server_round, combined["auc"], combined["sensitivity"], combined["specificity"],
                 combined["n"], len(per_site))
        return MetricRecord({k: float(v) for k, v in combined.items()})

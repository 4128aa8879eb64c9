"""FedAvg restricted to the run's admitted sites, with every round written to the audit log."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common import metrics
from common.canon import arrays_sha256
from server.audit import AuditLog
from server.phases import Federation, error_reason

log = logging.getLogger("flwr.radfed.server")

def record_sha256(record: ArrayRecord) -> str:
    return arrays_sha256(dict(zip(record.keys(), record.to_numpy_ndarrays(), strict=True)))


class AuditedFedAvg(FedAvg):
    """FedAvg over the federation's admitted sites only; a site that fails a round is dropped,
    recorded as a dropout, and the run stops cleanly if fewer than ``min_sites`` remain.

    ``site_evaluations[round][site]`` keeps each site's held-out counts and AUC;
    ``site_training[round][site]`` its case count and loss.
    """

    def __init__(self, fed: Federation, audit: AuditLog, **kwargs: object) -> None:
        n = len(fed.sites)
        super().__init__(min_train_nodes=n, min_evaluate_nodes=n, min_available_nodes=n, **kwargs)  # type: ignore[arg-type]
        self.fed = fed
        self.sites = fed.sites  # shared: a dropout here is a dropout of the federation
        self.audit = audit
        self.site_training: dict[int, dict[str, dict[str, float]]] = {}
        self.site_evaluations: dict[int, dict[str, dict[str, float]]] = {}

    def _messages(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                  message_type: str) -> Iterable[Message]:
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, list(self.sites), message_type)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self._messages(server_round, arrays, config, MessageType.TRAIN)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self._messages(server_round, arrays, config, MessageType.EVALUATE)

    def _drop_failures(self, server_round: int, phase: str, replies: list[Message]) -> list[Message]:
        answered = {m.metadata.src_node_id for m in replies}
        good = []
        for msg in replies:
            if msg.has_error():
                self.fed.drop(self.audit, msg.metadata.src_node_id, phase, error_reason(msg), server_round)
            else:
                good.append(msg)
        for node_id in [n for n in self.sites if n not in answered]:
            self.fed.drop(self.audit, node_id, phase, "no reply before the timeout", server_round)
        self.fed.require_enough(f"round {server_round} ({phase})")
        return good

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        good = self._drop_failures(server_round, "train", list(replies))
        arrays, agg = super().aggregate_train(server_round, good)
        per_site = {self.sites[m.metadata.src_node_id]: {
            "n": int(m.content["metrics"]["num-examples"]),  # type: ignore[arg-type]
            "loss": float(m.content["metrics"]["train-loss"]),  # type: ignore[arg-type]
            "update_sha256": record_sha256(m.content["arrays"]),  # type: ignore[arg-type]
        } for m in good}
        self.site_training[server_round] = per_site
        self.audit.append("round-train", round=server_round, sites=per_site,
                          aggregated_sha256=record_sha256(arrays) if arrays is not None else None)
        return arrays, agg

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        good = self._drop_failures(server_round, "evaluate", list(replies))
        per_site = {}
        for m in good:
            rec = m.content["metrics"]
            per_site[self.sites[m.metadata.src_node_id]] = {
                "n": int(rec["num-examples"]),  # type: ignore[arg-type]
                **{k: int(rec[k]) for k in metrics.COUNT_KEYS},  # type: ignore[arg-type]
                "auc": float(rec["auc"]), "loss": float(rec["loss"]),  # type: ignore[arg-type]
            }
        for values in per_site.values():
            values.update(metrics.rates(values))
        self.site_evaluations[server_round] = per_site
        combined = metrics.combine_sites(list(per_site.values()))
        self.audit.append("round-evaluate", round=server_round, sites=per_site, aggregate=combined)
        log.info("Round %d: held-out AUC %.3f, sensitivity %.3f, specificity %.3f over %d cases at %d sites",
                 server_round, combined["auc"], combined["sensitivity"], combined["specificity"],
                 combined["n"], len(per_site))
        return MetricRecord({k: float(v) for k, v in combined.items()})

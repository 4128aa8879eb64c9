"""The privacy guard: a Flower client mod that checks every reply against ``common.protocol``.

It refuses (raises, so nothing is sent) any record or key the protocol does not declare, any array
whose shape is not exactly the declared one in the run's agreed sizes (so nothing can scale with the
number of cases), any statistic over fewer than k cases (the larger of the run's k and the site's own),
any reply that does not name the case sets behind its counts, and any reply whose case sets, combined with
everything the site released in any run before, would single out fewer than k patients (client.ledger).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Collection
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode

from client import nodestate, runcache
from client.ledger import Declaration, Ledger, append_line, take
from client.nodestate import NodeState
from client.site import site_floor, site_settings
from client.sitefiles import SiteFiles
from client.steps import locate_site, run_config
from common.canon import canonical_json, json_safe
from common.protocol import CUMULATIVE_ROWS, EACH_ENTRY, FIRST_COLUMN, NESTED_ROWS, WITHHELD_WHEN_NOISED, reply_spec
from common.runconfig import RunConfig

SITE_STATE = "radfed-site"  # context.state record holding what the site agreed to ("features", ...)


def site_state_key(fold: str) -> str:
    """The state record of one cohort: the main federation's, or a fold's (folds run interleaved, so each keeps
    its own feature lists and sizes)."""
    return f"{SITE_STATE}:{fold}" if fold else SITE_STATE


# Each name list a cohort agreed to is kept by the node as its canonical JSON under its hash (client.nodestate), and the
# cohort's record names the hash: Flower ships a node's whole state with every message, and a list of ~860 names is
# 42 KB (the leave-one-site-out folds mostly agree the same list: it is kept once).
_BY_HASH = "sha256:"


def keep_names(node: NodeState, record: ConfigRecord, key: str, names: list[str], digest: str) -> None:
    """Remember ``names`` (whose ``common.canon.sha256_json`` is ``digest``) as ``record[key]``."""
    if record.get(key) == _BY_HASH + digest:
        return  # the cohort's list again (every train, evaluate and newton message names the model's inputs)
    if not node.has(digest):  # another cohort's same list (each fold's moments request): not encoded again (42 KB)
        node.put(canonical_json(names).encode("utf-8"), digest)  # the bytes sha256_json hashes: named by its hash
    record[key] = _BY_HASH + digest


def agreed_names(node: NodeState, record: ConfigRecord, key: str) -> list[str] | None:
    """The name list kept as ``record[key]`` (by ``keep_names``, or as a plain list), None when there is none."""
    value = record.get(key)
    if isinstance(value, str) and value.startswith(_BY_HASH):
        return list(_names(node.get(value[len(_BY_HASH):], f"{key} list")))
    return None if value is None else list(value)  # type: ignore[arg-type]


@functools.lru_cache(maxsize=256)
def _names(blob: bytes) -> tuple[str, ...]:
    """A kept list's names, decoded once per process (the guard asks for every reply's sizes)."""
    return tuple(str(n) for n in json.loads(blob))


class PrivacyError(RuntimeError):
    """A reply that would break the privacy rules; names the offending key."""


def check_reply(message_type: str, content: RecordDict, k: int, sizes: dict[str, int] | None = None,
                noised: bool = False) -> None:
    """Raise PrivacyError unless ``content`` is an allowed reply to ``message_type``.

    ``noised``: the run noises the query phases (``dp-query-noise-multiplier`` > 0); their replies must then be
    the noised ones (``common.protocol.NOISED_REPLIES``), whose exact counts stay at the site and are checked by
    ``check_release`` on the declared case sets.

    ``sizes`` gives the run's shape symbols (``d`` agreed features, ``q`` ComBat design columns,
    ``m`` selection candidates, ``s`` model features);
    every array must have exactly its declared shape, and with a symbol still unknown no such array
    may be sent at all.
    """
    spec = reply_spec(message_type, noised)
    if spec is None:
        raise PrivacyError(f"message type {message_type!r} is not in the protocol: nothing is sent")
    if noised and message_type in WITHHELD_WHEN_NOISED:
        raise PrivacyError(f"{message_type}: not sent while the query phases are noised (dp-query-noise-multiplier)")
    sizes = sizes or {}
    for name, record in content.items():
        if name not in spec.record_names:
            raise PrivacyError(f"{message_type}: record {name!r} is not declared in the protocol")
        if isinstance(record, ConfigRecord):
            allowed: Collection[str] = spec.config
        elif isinstance(record, MetricRecord):
            allowed = spec.metrics
        elif isinstance(record, ArrayRecord):
            allowed = spec.arrays
        else:
            raise PrivacyError(f"{message_type}: record {name!r} has an undeclared type {type(record).__name__}")
        for key in record:
            if key not in allowed:
                raise PrivacyError(f"{message_type}: key {key!r} in record {name!r} is not declared in the protocol")
        if isinstance(record, ArrayRecord):
            for key, array in record.items():
                declared = spec.arrays[key].shape
                expected = tuple(sizes.get(dim, -1) if isinstance(dim, str) else dim for dim in declared)
                if tuple(array.shape) != expected:
                    raise PrivacyError(
                        f"{message_type}: array {key!r} has shape {tuple(array.shape)}, not its declared shape "
                        f"{declared} = {expected} (-1: not yet agreed): it could hold per-case values")
                if spec.arrays[key].k_rule == NESTED_ROWS:
                    _check_nested(message_type, key, record, k)
                elif spec.arrays[key].k_rule:  # arrays of counts (a model's weights have no count rule)
                    _check_counts(message_type, key, array.numpy(), spec.arrays[key].k_rule, k)
    metrics = [r for r in content.values() if isinstance(r, MetricRecord)]
    for count_key in spec.count_keys if spec.counts_sent else ():
        counts = [int(r[count_key]) for r in metrics if count_key in r]  # type: ignore[arg-type]
        if not counts:
            raise PrivacyError(f"{message_type}: the reply must state its case count {count_key!r}")
        if counts[0] < k:
            raise PrivacyError(f"{message_type}: {count_key!r} = {counts[0]} is fewer than k = {k} cases; "
                               "nothing is sent")


def _check_counts(message_type: str, key: str, values: np.ndarray, rule: str, k: int) -> None:
    """Arrays of counts: every count (or step of cumulative counts) must be 0 or cover >= k cases."""
    if not rule:
        return
    if rule == CUMULATIVE_ROWS:
        totals = values.sum(axis=1)
        counts = np.diff(np.r_[0.0, totals])
    elif rule == FIRST_COLUMN:
        counts = values[:, 0]
    elif rule == EACH_ENTRY:
        counts = values.ravel()
    else:
        raise PrivacyError(f"{message_type}: array {key!r} declares an unknown count rule {rule!r}")
    small = counts[(counts != 0) & (counts < k)]
    if small.size or np.any(counts < 0):
        raise PrivacyError(f"{message_type}: array {key!r} holds a count of {small.min() if small.size else 'below 0'}"
                           f" cases, fewer than k = {k}; nothing is sent")


def _check_nested(message_type: str, key: str, record: ArrayRecord, k: int) -> None:
    """Counts of nested sets released at some rows (``<key>-kept``): along class totals (``<key>-totals``) ->
    each kept row -> none, every step must be 0 or >= k cases of each class, or subtracting two released counts
    would give a count over fewer than k cases."""
    partners = (f"{key}-kept", f"{key}-totals")
    if any(name not in record for name in partners):
        raise PrivacyError(f"{message_type}: array {key!r} is sent without {partners[0]!r} and {partners[1]!r}, "
                           "which its k rule is checked against; nothing is sent")
    values = record[key].numpy()
    kept, totals = record[partners[0]].numpy(), record[partners[1]].numpy()
    if not np.all((kept == 0) | (kept == 1)) or np.any(values[kept == 0] != 0):
        raise PrivacyError(f"{message_type}: array {key!r} holds counts at thresholds {partners[0]!r} does not "
                           "mark as released; nothing is sent")
    chain = np.vstack([totals[None, :], values[kept == 1], np.zeros((1, values.shape[1]))])
    steps = -np.diff(chain, axis=0)
    if np.any(steps < 0):
        raise PrivacyError(f"{message_type}: array {key!r} does not hold counts of nested sets (a count grows "
                           "with the threshold); nothing is sent")
    small = steps[(steps != 0) & (steps < k)]
    if small.size:
        raise PrivacyError(f"{message_type}: array {key!r} changes by {small.min():g} cases of one class between "
                           f"released thresholds, fewer than k = {k}; nothing is sent")


def _fold_of(msg: Message) -> str:
    config = msg.content.get("config") if msg.has_content() else None
    return str(config.get("fold", "")) if isinstance(config, ConfigRecord) else ""


def agreed_sizes(context: Context, fold: str = "") -> dict[str, int]:
    """The run's shape symbols as this site agreed them for the cohort ``fold`` (kept in ``context.state``)."""
    sizes = dict(_run_sizes(run_config(context.run_config)))
    site = context.state.get(site_state_key(fold))
    if not isinstance(site, ConfigRecord):
        return sizes
    node = nodestate.of(context)
    # only the lists' lengths are read: counted on the kept names, not copied (every reply of every fold asks)
    lengths = {key: n for key in ("features", "candidates", "selected", "histogram-features")
               if (n := _agreed_count(node, site, key)) is not None}
    if "features" in lengths:
        sizes["d"] = lengths["features"]
    if "design-columns" in site:
        sizes["q"] = int(site["design-columns"])  # type: ignore[arg-type]
    if "candidates" in lengths:
        sizes["m"] = lengths["candidates"]
    if "selected" in lengths:
        sizes["s"] = lengths["selected"]
        sizes["c"] = sizes["s"] + 1
    if "histogram-features" in lengths:
        sizes["h"] = lengths["histogram-features"]
        sizes["b"] = int(site["histogram-bins"])  # type: ignore[arg-type]
    return sizes


def _agreed_count(node: NodeState, record: ConfigRecord, key: str) -> int | None:
    """``len(agreed_names(node, record, key))`` (None when there is none), without copying the list."""
    value = record.get(key)
    if isinstance(value, str) and value.startswith(_BY_HASH):
        return len(_names(node.get(value[len(_BY_HASH):], f"{key} list")))
    return None if value is None else len(value)  # type: ignore[arg-type]


_RUN_SIZES: dict[int, tuple[RunConfig, dict[str, int]]] = {}


def _run_sizes(run: RunConfig) -> dict[str, int]:
    """The shape symbols the run config alone fixes, worked out once per (frozen) config object: a run's messages
    share one (client.steps.run_config); kept with the object, so a reused id never serves another config."""
    kept = _RUN_SIZES.get(id(run))
    if kept is None or kept[0] is not run:
        sizes = {"p": run.curve_points, "g": run.score_bins, "t": run.decision_thresholds, "u": run.mlp_hidden,
                 "f": len(run.compared), "o": 2 ** (run.tree_depth - 1), "v": run.tree_bins}
        if len(_RUN_SIZES) > 64:  # a long-lived process serving many runs
            _RUN_SIZES.clear()
        kept = _RUN_SIZES[id(run)] = (run, sizes)
    return kept[1]


def describe(content: RecordDict, values: bool = False) -> dict[str, dict[str, object]]:
    """What a reply holds, for the outbox: config and metric values as sent; arrays as shape, size and sha256
    (and, with ``values``, every number). Strict JSON as ``common.canon.json_safe`` makes it (NaN/Inf -> None,
    numpy scalars -> Python): applied to the values as sent and to the arrays' numbers only, as an array's shape,
    size and hash already are (every reply of every fold is described)."""
    out: dict[str, dict[str, object]] = {}
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            out[str(name)] = {str(key): {"shape": [int(n) for n in arr.shape], "bytes": len(arr.data),
                                         "sha256": hashlib.sha256(arr.data).hexdigest(),
                                         **({"values": json_safe(arr.numpy().tolist())} if values else {})}
                              for key, arr in record.items()}
        else:
            out[str(name)] = json_safe({key: (f"<{len(value)} items>" if isinstance(value, list) and len(value) > 8
                                              else value) for key, value in record.items()})  # type: ignore[union-attr]
    return out


@functools.lru_cache(maxsize=64)
def _site_files(output_dir: str) -> tuple[Path, Path]:
    """(outbox, release ledger folder) of a site's output folder: every reply names both."""
    files = SiteFiles(Path(output_dir))
    return files.outbox, files.release


def record_outgoing(site_dir: Path, run_id: int, message_type: str, content: RecordDict, fold: str = "",
                    settings: dict | None = None) -> None:
    """Append what is about to leave to the site's local outbox (``<output_dir>/outbox.jsonl``); ``fold`` names
    the cohort the reply serves ("" for the main federation, else e.g. the held-out site of a fold); ``settings``:
    the site's (``client.site.site_settings(site_dir)``), when the caller has them."""
    settings = site_settings(site_dir) if settings is None else settings
    entry = {"time": datetime.now(UTC).isoformat(timespec="milliseconds"), "run_id": json_safe(run_id),
             "type": str(message_type), "records": describe(content, bool(settings.get("outbox_values"))),
             **({"fold": str(fold)} if fold else {})}
    # inside a batch, appended with the batch's ledger update once every sub-reply is checked (client.ledger)
    append_line(_site_files(str(settings["output_dir"]))[0], json.dumps(entry, sort_keys=True) + "\n")


def check_release(message_type: str, content: RecordDict, declared: Declaration | None, ledger: Ledger,
                  run_id: int, k: int | None = None, noised: bool = False) -> None:
    """Refuse unless the reply names the case set behind each of its counts (sizes equal) and those sets keep
    the ledger's invariant with every earlier release; then record them as released.

    A noised reply (``noised``) sends no exact count: each count key's declared set must then hold >= ``k``
    patients itself."""
    spec = reply_spec(message_type, noised)
    if spec is None:
        raise PrivacyError(f"message type {message_type!r} is not in the protocol: nothing is sent")
    if not spec.count_keys:
        return  # counts from the manifest only: no statistic of any case's values
    if declared is None:
        raise PrivacyError(f"{message_type}: the reply does not name the cases it aggregates over; nothing is sent")
    metrics: dict[str, object] = {}
    for record in content.values():
        if isinstance(record, MetricRecord):
            metrics.update(record)
    for key in spec.count_keys:
        name = declared.counts.get(key)
        if name is None or name not in declared.sets:
            raise PrivacyError(f"{message_type}: no case set is named for the count {key!r}; nothing is sent")
        if not spec.counts_sent:
            if k is None:
                raise PrivacyError(f"{message_type}: a noised reply is checked against k, and none was given")
            if len(declared.sets[name]) < k:
                raise PrivacyError(f"{message_type}: {key!r} counts {len(declared.sets[name])} patients, fewer than "
                                   f"k = {k}; nothing is sent")
        elif int(metrics[key]) != len(declared.sets[name]):  # type: ignore[call-overload]
            raise PrivacyError(f"{message_type}: {key!r} = {metrics[key]} but its case set {name!r} holds "
                               f"{len(declared.sets[name])} patients; nothing is sent")
    why = ledger.check(declared.sets)
    if why:
        raise PrivacyError(f"{message_type}: {why}; nothing is sent (see docs/privacy.md, the release rule)")
    ledger.record(run_id, message_type, declared.sets, declared.blocking)


def privacy_guard(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Client mod: run the handler, check its reply against the protocol and the release ledger, and log it in
    the outbox before it leaves the site."""
    reply = call_next(msg, context)
    declared = take(msg.metadata.message_id)
    if reply.has_error():
        return reply
    run, site_dir, settings, ledger = _site_of(context)
    k = max(run.min_cases_per_class, ledger.k)  # the site's own floor holds whatever the run asks
    noised = run.dp_query
    fold = _fold_of(msg)
    check_reply(msg.metadata.message_type, reply.content, k, agreed_sizes(context, fold), noised)
    check_release(msg.metadata.message_type, reply.content, declared, ledger, context.run_id, k, noised)
    record_outgoing(site_dir, context.run_id, msg.metadata.message_type, reply.content, fold, settings)
    return reply


def _site_of(context: Context) -> tuple[RunConfig, Path, dict, Ledger]:
    """(run config, site folder, site settings, release ledger with the site's own k) of the node answering: once per
    look (one message or ``query.batch``), whose lookups all see one stamped state of the site anyway
    (client.runcache), instead of once per sub-reply."""
    def make() -> tuple[RunConfig, Path, dict, Ledger]:
        run = run_config(context.run_config)
        site_dir = locate_site(context.node_config, run)
        settings = site_settings(site_dir)
        return run, site_dir, settings, Ledger(_site_files(str(settings["output_dir"]))[1], site_floor(settings))

    return runcache.in_look(("guard-site", id(context)), context, make)


def _local_paths(context: Context) -> list[tuple[str, str]]:
    """(path, placeholder) pairs, longest first, of the folders a site's messages may name."""
    pairs: list[tuple[str, str]] = []
    try:
        site_dir = locate_site(context.node_config, run_config(context.run_config))
        settings = site_settings(site_dir)
        pairs += [(str(Path(settings["output_dir"])), "<site output_dir>"),
                  (str(Path(settings["data_root"])), "<site data_root>"),
                  (str(site_dir.expanduser().resolve()), "<site>"), (str(site_dir), "<site>")]
    except Exception:  # noqa: BLE001  # the site folder itself may be what is wrong
        pass
    pairs.append((str(Path.home()), "~"))
    return sorted({p: h for p, h in pairs if len(p) > 1}.items(), key=lambda ph: -len(ph[0]))


def redact_local_paths(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Client mod (outermost): an error leaves the site as its message with the site's folders replaced by
    placeholders ("see <site output_dir>/errors.json at the site"); the full text stays in the site's log."""
    try:
        return call_next(msg, context)
    except Exception as exc:
        text = str(exc)
        for path, placeholder in _local_paths(context):
            text = text.replace(path, placeholder)
        logging.getLogger("flwr.radfed.client").error("refusing %s: %s", msg.metadata.message_type, exc)
        # an error reply, as Flower's own mods send one: a refusal is an answer, not a crash (no traceback in the
        # logs, and the text arrives as the site wrote it)
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=text), reply_to=msg)

"""`radfed deploy <command>`: a radfed federation on real Flower processes, with TLS and SuperNode
authentication. Everything lives in one deployment folder (``--dir``, default ``~/.radfed/deploy`` or
``$RADFED_DEPLOY_DIR``):

  provision --sites a,b,c [--host NAME]     CA + SuperLink certificate (pki/), one node key pair per site (keys/)
  superlink [--host H] [--port P]           start flower-superlink (TLS, --enable-supernode-auth, state in a database)
                                            on 127.0.0.1 and the Fleet-only gateway on H:P; again after a stop or
                                            crash: same ports, same database, the sites stay registered
  register [--sites a,b]                    register the sites' public keys with the SuperLink
  supernode --name NAME --site DIR          start one hospital's flower-supernode in the background
  run [--plan plan.json] [--run-config ..]  flwr run (of the approved plan), its log stream; then status and outputs
  status [--json]                           which processes are alive; Flower's runs and SuperNodes
  stop [NAME ...]                           SIGTERM the SuperNodes and the SuperLink, then SIGKILL stragglers

This module holds the seven commands and their parser. The folder's layout and the process records are in
deploy.layout, the processes and how they are stopped in deploy.processes, what Flower tells (its CLI's JSON,
the few facts only its logs hold) in deploy.flower. See docs/deployment.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from deploy import flower
from deploy.flower import FlowerError
from deploy.layout import (
    CONNECTION,
    DEFAULT_DIR,
    home,
    log_path,
    pki,
    read_record,
    record_path,
    records,
    write_connection,
    write_record,
)
from deploy.processes import (
    STOP_GRACE,
    await_port,
    check_control_host,
    connect_host,
    env_for,
    free_port,
    host_port,
    is_running,
    main_alive,
    program,
    start,
    stop_processes,
    tail,
)
from deploy.runs import plan_run_config, run

APP_DIR = Path(__file__).resolve().parent.parent
GATEWAY = "fleet-gateway"  # the record of the public Fleet API gateway (deploy/gateway.py)


def _refuse_if_running(d: Path, name: str) -> None:
    rec = read_record(d, name)
    if rec and is_running(rec):
        raise SystemExit(f"{name} is already running (pid {rec['pid']}); stop it first: radfed deploy stop {name}")


# ----------------------------------------------------------------------------------------------------------
# commands


def cmd_provision(args: argparse.Namespace) -> int:
    from deploy.pki import provision

    sites = [s.strip() for s in args.sites.split(",") if s.strip()] if args.sites else []
    result = provision(args.dir, sites, args.host or [])
    for path in result.kept:
        print(f"kept     {path} (exists; remove it yourself to replace it)")
    for path in result.created:
        print(f"created  {path}")
    print(f"\nSuperLink: radfed deploy superlink --dir {args.dir}\n"
          f"each hospital gets {pki(args.dir) / 'ca.crt'} and its own private key keys/<site> "
          "(the .pub stays with the coordinator for `register`)")
    return 0


def _start_gateway(d: Path, host: str, port: int, upstream: str, wait: float) -> str | None:
    """Start deploy/gateway.py on the public address (or keep the running one if it already serves this
    address for this upstream); None when it listens, else why not."""
    files = {name: str(pki(d) / name) for name in ("ca.crt", "server.crt", "server.key")}
    cmd = [sys.executable, "-m", "deploy.gateway", "--listen-host", host, "--listen-port", str(port),
           "--upstream", upstream, "--ca", files["ca.crt"], "--cert", files["server.crt"],
           "--key", files["server.key"]]
    old = read_record(d, GATEWAY)
    if old and main_alive(old):
        if old["cmd"][1:] == cmd[1:]:
            return None  # SuperNodes keep their connections to it across a SuperLink restart
        stop_processes([old], grace=5)
    log = log_path(d, GATEWAY)
    env = env_for(home(d))
    env["PYTHONPATH"] = str(APP_DIR) + os.pathsep + env.get("PYTHONPATH", "")
    proc = start(cmd, env, log)
    write_record(d, {"name": GATEWAY, "role": "gateway", "program": "deploy.gateway", "pid": proc.pid,
                      "address": host_port(host, port), "upstream": upstream, "log": str(log), "cmd": cmd,
                      "started": datetime.now(UTC).isoformat(timespec="seconds")})
    return await_port(proc, host, port, wait, log, "the Fleet gateway")


def cmd_superlink(args: argparse.Namespace) -> int:
    d = args.dir
    files = {name: pki(d) / name for name in ("ca.crt", "server.crt", "server.key")}
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}: run radfed deploy provision --dir {d} --sites ...")
    running = read_record(d, "superlink")
    if running and main_alive(running):
        raise SystemExit(f"superlink is already running (pid {running['pid']}); stop it first: radfed deploy stop "
                         "superlink (after a SIGTERM it waits for `flwr log --stream` clients other than radfed "
                         "deploy run until their run has failed, about a minute; SIGINT ends the wait)")
    if running:  # what a crashed SuperLink left behind (its flower-superexec) must not hold on
        stop_processes([running], grace=10)
    # a restart (after `stop` or a crash) keeps the addresses and the database unless told otherwise:
    # the SuperNodes and the coordinator's connection know them
    settings = d / "state" / "superlink.json"
    prev = json.loads(settings.read_text(encoding="utf-8")) if settings.exists() else {}
    host = args.host or prev.get("host") or "127.0.0.1"
    control_host = args.control_host or prev.get("control_host") or "127.0.0.1"
    check_control_host(control_host, host)
    port = args.port or prev.get("port") or free_port(host)
    control_port = args.control_port or prev.get("control_port") or free_port(control_host)
    database = Path(args.database or prev.get("database") or d / "state" / "superlink.db").expanduser().resolve()
    database.parent.mkdir(parents=True, exist_ok=True)
    restart = database.exists()
    # the SuperLink (Control, Runtime and its own Fleet API: Flower serves them on one address) stays local;
    # SuperNodes reach its Fleet API through the gateway on the public address
    cmd = [program("flower-superlink"), "--ssl-ca-certfile", str(files["ca.crt"]), "--ssl-certfile",
           str(files["server.crt"]), "--ssl-keyfile", str(files["server.key"]), "--enable-supernode-auth",
           "--disable-runtime-dependency-installation", "--database", str(database),
           "--host", control_host, "--port", str(control_port)]
    settings.write_text(json.dumps({"host": host, "port": port, "control_host": control_host,
                                    "control_port": control_port, "database": str(database)}, indent=2),
                        encoding="utf-8")
    log = log_path(d, "superlink")
    proc = start(cmd, env_for(home(d)), log)
    address, control = host_port(connect_host(host), port), host_port(control_host, control_port)
    write_record(d, {"name": "superlink", "role": "superlink", "program": "flower-superlink", "pid": proc.pid,
                      "address": address, "host": host, "port": port, "control_address": control,
                      "control_host": control_host, "control_port": control_port, "database": str(database),
                      "log": str(log), "cmd": cmd, "started": datetime.now(UTC).isoformat(timespec="seconds")})
    problem = await_port(proc, control_host, control_port, args.wait, log, "flower-superlink") or \
        _start_gateway(d, host, port, control, args.wait)
    if problem:
        print(problem, file=sys.stderr)
        stop_processes([r for r in (read_record(d, GATEWAY), read_record(d, "superlink")) if r], grace=10)
        return 1
    config = write_connection(d, control)
    print(f"SuperLink running: pid {proc.pid} (TLS, SuperNode authentication)"
          f"{', restarted on its database' if restart else ''}\n"
          f"  Fleet API   {host_port(host, port)} (the gateway; the only address to open to the hospitals)\n"
          f"  Control API {control} (local: flwr run, flwr supernode register; never expose it)\n"
          f"  database    {database} (registered sites and runs survive a restart)\n"
          f"  log         {log}, {log_path(d, GATEWAY)}\n  connection  '{CONNECTION}' in {config}\n"
          f"  SuperNodes connect with --superlink <this host>:{port} (the certificate's names: localhost, "
          f"127.0.0.1{''.join(', ' + h for h in _extra_hosts(d))})")
    return 0


def _extra_hosts(d: Path) -> list[str]:
    from deploy.pki import DEFAULT_HOSTS, san_hosts

    return [h for h in san_hosts(pki(d) / "server.crt") if h not in DEFAULT_HOSTS]


def _require_connection(d: Path) -> None:
    if not (home(d) / "config.toml").exists():
        raise SystemExit(f"no connection in {home(d) / 'config.toml'}: start the SuperLink first "
                         f"(radfed deploy superlink --dir {d})")


def cmd_register(args: argparse.Namespace) -> int:
    d = args.dir
    _require_connection(d)
    keys = d / "keys"
    sites = [s.strip() for s in args.sites.split(",") if s.strip()] if args.sites else \
        sorted(p.stem for p in keys.glob("*.pub"))
    if not sites:
        raise SystemExit(f"no public keys in {keys}: radfed deploy provision --dir {d} --sites a,b,c")
    failed = 0
    for site in sites:
        pub = keys / f"{site}.pub"
        if not pub.exists():
            print(f"{site}: no public key {pub}", file=sys.stderr)
            failed += 1
            continue
        try:
            node_id = flower.register(d, pub, site)
        except FlowerError as exc:
            failed += 1
            print(f"{site}: registration failed: {exc}", file=sys.stderr)
            continue
        print(f"{site}: " + (f"registered as SuperNode {node_id}" if node_id is not None else "already registered"))
    return 1 if failed else 0


def cmd_supernode(args: argparse.Namespace) -> int:
    from deploy.pki import check_site_name

    d, site = args.dir, check_site_name(args.name)
    site_dir = Path(args.site_dir).expanduser().resolve()
    if not site_dir.is_dir():
        raise SystemExit(f"site folder {site_dir} does not exist")
    if "'" in str(site_dir):
        raise SystemExit(f"site folder {site_dir}: a path with a single quote cannot go into --node-config")
    key = Path(args.key) if args.key else d / "keys" / site
    ca = Path(args.ca) if args.ca else pki(d) / "ca.crt"
    for path in (key, ca):
        if not path.exists():
            raise SystemExit(f"missing {path}")
    superlink = args.superlink
    if not superlink:
        rec = read_record(d, "superlink")
        if not rec:
            raise SystemExit("no SuperLink recorded in this deployment folder: pass --superlink host:port")
        superlink = rec["address"]
    _refuse_if_running(d, site)
    port = args.port or free_port()
    cmd = [program("flower-supernode"), "--root-certificates", str(ca), "--superlink", superlink,
           "--auth-supernode-private-key", str(key), "--node-config", f"site-dir='{site_dir}'",
           "--port", str(port)]
    log = log_path(d, f"supernode-{site}")
    offset = log.stat().st_size if log.exists() else 0
    proc = start(cmd, env_for(home(d, site)), log)
    write_record(d, {"name": site, "role": "supernode", "program": "flower-supernode", "pid": proc.pid,
                      "superlink": superlink, "port": port, "site_dir": str(site_dir), "log": str(log), "cmd": cmd,
                      "started": datetime.now(UTC).isoformat(timespec="seconds")})
    # joined: it logs its node id; refused (unregistered key, node still marked online) or unreachable:
    # it exits within seconds (code 305) or keeps retrying. Its log is all a hospital has (deploy.flower).
    deadline, node_id = time.monotonic() + args.wait, None
    while time.monotonic() < deadline and proc.poll() is None and node_id is None:
        time.sleep(0.3)
        node_id = flower.node_id_in_log(log, offset)
    if proc.poll() is not None:
        flower_code = flower.exit_code_in_log(log, offset)  # the process itself exits with 1
        hint = (" (305: the SuperLink refused it or could not be reached: is its public key registered "
                "(radfed deploy register), the address right, the CA the federation's? After a crash a node "
                "can rejoin only once the SuperLink has marked it offline, up to 60 s)") if flower_code == 305 else ""
        print(f"flower-supernode for {site} exited (code {proc.returncode}, Flower exit code {flower_code}){hint}:\n"
              f"{tail(log)}", file=sys.stderr)
        return 1
    joined = f"joined as node {node_id}" if node_id else f"not joined yet after {args.wait:.0f}s (still trying)"
    print(f"SuperNode {site} running: pid {proc.pid}, {joined}, SuperLink {superlink}, site folder {site_dir}\n"
          f"  log  {log}")
    return 0 if node_id else 3


def cmd_run(args: argparse.Namespace) -> int:
    _require_connection(args.dir)
    app = Path(args.app).resolve()
    run_config = args.run_config
    if args.plan:  # the approved plan is the run's settings: they cannot drift from what the sites approved
        run_config = plan_run_config(Path(args.plan).expanduser(), app, run_config)
        print(f"running the approved plan {args.plan}")
    return run(args.dir, app, run_config, args.quiet)


def _status(d: Path) -> dict[str, Any]:
    """What `status` reports: our processes; Flower's runs and SuperNodes (None while no SuperLink runs)."""
    procs = [{**rec, "state": "running" if is_running(rec) else "stopped"} for rec in records(d)]
    doc: dict[str, Any] = {"dir": str(d), "processes": procs, "runs": None, "supernodes": None, "errors": {}}
    link = read_record(d, "superlink")
    if link and is_running(link):
        for key, query in (("runs", flower.runs), ("supernodes", flower.supernodes)):
            try:
                doc[key] = query(d)
            except FlowerError as exc:
                doc["errors"][key] = str(exc)
    return doc


def cmd_status(args: argparse.Namespace) -> int:
    doc = _status(args.dir)
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    if not doc["processes"]:
        print(f"nothing recorded in {args.dir / 'procs'}")
    for rec in doc["processes"]:
        where = {"superlink": f"Control API {rec.get('control_address')}, database {rec.get('database')}",
                 "gateway": f"Fleet API {rec.get('address')} -> SuperLink {rec.get('upstream')}"}.get(
            rec["role"], f"-> {rec.get('superlink')}, site {rec.get('site_dir')}")
        print(f"{rec['role']:9} {rec['name']:16} pid {rec['pid']:<8} {rec['state']:8} {where}\n{'':10}log {rec['log']}")
    if doc["runs"] is not None:
        print("\nruns (flwr ls):")
        for run in doc["runs"]:
            print(f"  run {run['run-id']:<20} {run['status']:20} {run['fab-id']}=={run['fab-version']}  "
                  f"elapsed {float(run.get('elapsed') or 0):.0f}s  {run.get('status-details') or ''}".rstrip())
    if doc["supernodes"] is not None:
        print("\nSuperNodes (flwr supernode ls):")
        for node in doc["supernodes"]:
            print(f"  node {node['node-id']:<20} {node['status']:8} online since {node.get('online-at')}")
    for what, error in doc["errors"].items():
        print(f"\n{what}: Flower did not answer: {error}", file=sys.stderr)
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    d = args.dir
    recs = [r for r in records(d) if not args.names or r["name"] in args.names]
    unknown = set(args.names or []) - {r["name"] for r in recs}
    if unknown:
        print(f"not recorded: {', '.join(sorted(unknown))}", file=sys.stderr)
    # SuperNodes first, so they leave while the SuperLink (and the gateway to it) can still take their goodbye
    nodes = [r for r in recs if r["role"] == "supernode"]
    link = [r for r in recs if r["role"] != "supernode"]
    outcome = {**stop_processes(nodes, args.grace), **stop_processes(link, args.grace)}
    for rec in recs:
        print(f"{rec['name']}: {outcome[rec['name']]} (pid {rec['pid']})")
        record_path(d, rec["name"]).unlink(missing_ok=True)
    return 1 if unknown else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="radfed deploy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_text: str, func: Any) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--dir", "--out", dest="dir", type=lambda s: Path(s).expanduser().resolve(),
                       default=DEFAULT_DIR, help=f"the deployment folder (default {DEFAULT_DIR})")
        p.set_defaults(func=func)
        return p

    p = add("provision", "CA, SuperLink certificate and one ECDSA P-384 node key pair per site", cmd_provision)
    p.add_argument("--sites", default="", help="comma-separated site names, e.g. hospital-a,hospital-b")
    p.add_argument("--host", action="append", help="another name or address the SuperLink is reached by "
                   "(repeatable; localhost and 127.0.0.1 are always in the certificate)")

    p = add("superlink", "start flower-superlink (TLS, SuperNode authentication, database) and its Fleet gateway",
            cmd_superlink)
    p.add_argument("--host", default=None, help="public address of the Fleet API, the one SuperNodes connect to "
                   "(default 127.0.0.1, or the previous start's)")
    p.add_argument("--port", type=int, default=0, help="its port (default: the previous start's, else a free one)")
    p.add_argument("--control-host", default=None, help="where the SuperLink itself listens: Control API "
                   "(flwr run, supernode register) and Runtime API; default 127.0.0.1. Never a wildcard or "
                   "the public --host")
    p.add_argument("--control-port", type=int, default=0, help="its port (default: the previous start's, else a "
                   "free one)")
    p.add_argument("--database", default=None, help="the SuperLink's state: registered SuperNodes, runs "
                   "(default state/superlink.db in the deployment folder)")
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the ports to open")

    p = add("register", "register the sites' public keys (keys/<site>.pub) with the SuperLink", cmd_register)
    p.add_argument("--sites", default="", help="comma-separated site names (default: every key in keys/)")

    p = add("supernode", "start one hospital's flower-supernode", cmd_supernode)
    p.add_argument("--name", required=True, help="the site's name, as provisioned: its key is keys/<NAME>, its "
                   "record and log are named after it")
    p.add_argument("--site", "--site-dir", dest="site_dir", required=True, metavar="DIR",
                   help="the hospital's site folder (manifest.csv or site.yaml), as everywhere in radfed")
    p.add_argument("--superlink", default=None, help="host:port (default: this folder's SuperLink)")
    p.add_argument("--key", default=None, help="the node's OpenSSH private key (default keys/<NAME>)")
    p.add_argument("--ca", default=None, help="the federation's CA certificate (default pki/ca.crt)")
    p.add_argument("--port", type=int, default=0, help="the SuperNode's local port (default: a free one)")
    p.add_argument("--wait", type=float, default=30.0, help="seconds to wait for it to join (exit code 3 if not yet)")

    p = add("run", "flwr run and its log stream; then the run's status, report and audit log", cmd_run)
    p.add_argument("--app", default=str(APP_DIR), help=f"the Flower App (default {APP_DIR})")
    p.add_argument("--run-config", default="", help="overrides, as for flwr run: \"num-server-rounds=10 ...\" "
                   "(with --plan: only data-root, output-dir, audit-key, query-timeout, send-batch)")
    p.add_argument("--plan", default=None, metavar="PLAN_JSON",
                   help="run exactly this approved plan (radfed plan write): its settings, refused if this app's "
                        "code, profile or defaults would make another plan")
    p.add_argument("--quiet", action="store_true", help="do not echo Flower's log stream (it is still kept)")

    p = add("status", "which processes are alive; Flower's runs and SuperNodes", cmd_status)
    p.add_argument("--json", action="store_true", help="print one JSON document (processes, runs, supernodes, "
                   "errors) to stdout instead of the summary")

    p = add("stop", "SIGTERM SuperNodes and SuperLink (process groups), then SIGKILL stragglers", cmd_stop)
    p.add_argument("names", nargs="*", help="only these (site names or 'superlink'); default: all")
    p.add_argument("--grace", type=float, default=STOP_GRACE, help="seconds between SIGTERM and SIGKILL")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (OSError, ValueError) as exc:  # e.g. a key that exists, a bad site name
        print(f"error: {exc}", file=sys.stderr)
        return 2

"""A real deployment on 127.0.0.1, driven through `radfed deploy` (the installed command): one SuperLink
with TLS and SuperNode authentication, one SuperNode per tiny synthetic hospital. Every process is
stopped at the end (process groups, SIGKILL for stragglers), also when a test fails.

Wall time on 2 cores: about 5 minutes (four federated runs; every message starts a fresh flwr-clientapp
that imports torch, about 10-13 s per phase with three sites).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import suppress

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from deploy_helpers import (
    BIN,
    PER_CLASS,
    RADFED,
    REPO,
    TEST_FRACTION,
    Deployment,
    K,
    deploy,
    ensure_supernodes,
    finish,
    refused_supernode,
    run_config,
    run_folder,
    start_run,
    start_supernode,
    stop_deployment,
    supernodes,
    wait_for_event,
)

from common.split import eligibility_problem
from deploy import flower
from deploy.layout import read_record, records, write_record
from deploy.layout import run_folder as find_run_folder
from deploy.pki import provision, san_hosts
from deploy.processes import env_for, flower_processes, stop_processes
from radfed import synth
from server.audit import verify


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> Deployment:
    root = tmp_path_factory.mktemp("deploy")
    specs = synth.tiny_sites(3, PER_CLASS)
    for spec in specs:  # each class has >= k cases in the training and in the held-out split
        assert eligibility_problem(spec.n_hgg, spec.n_bm, K, TEST_FRACTION, block=K) is None, spec
    sites = {spec.name: synth.write_site(root / "sites", spec, seed=700 + i) for i, spec in enumerate(specs)}
    dep = Deployment(root / "federation", sites, root / "runs", root / "coordinator-audit-key.pem")
    try:
        deploy(dep.dir, "provision", "--sites", ",".join(sites))
        deploy(dep.dir, "superlink")
        deploy(dep.dir, "register")
        for name in sites:
            start_supernode(dep, name)
        yield dep
    finally:
        stop_deployment(dep)


def kill_site(dep: Deployment, name: str, sig: signal.Signals) -> None:
    with suppress(ProcessLookupError):
        os.killpg(int(read_record(dep.dir, name)["pid"]), sig)  # its flower-superexec and flwr-clientapp too


# ---------------------------------------------------------------------------------------------------------


def test_provision_keeps_existing_keys_and_flower_reads_them(tmp_path):
    first = provision(tmp_path, ["site-a"])
    assert len(first.created) == 6 and not first.kept
    before = {p: p.read_bytes() for p in first.created}
    second = provision(tmp_path, ["site-a", "site-b"])
    assert set(second.kept) == set(first.created) and len(second.created) == 2
    assert all(p.read_bytes() == data for p, data in before.items())  # nothing overwritten
    # a certificate that does not cover a new host name is kept and named, not silently reissued
    with pytest.raises(FileExistsError, match="coordinator.example"):
        provision(tmp_path, [], hosts=["coordinator.example"])
    assert {"localhost", "127.0.0.1"} <= set(san_hosts(tmp_path / "pki" / "server.crt"))
    # what flower-supernode and `flwr supernode register` load: an ECDSA P-384 key in OpenSSH format
    key = load_ssh_private_key((tmp_path / "keys" / "site-a").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert (tmp_path / "keys" / "site-a").stat().st_mode & 0o077 == 0
    from flwr.cli.supernode.register import try_load_public_key

    assert try_load_public_key(tmp_path / "keys" / "site-a.pub")
    bad = deploy(tmp_path, "provision", "--sites", "a b", check=False)
    assert bad.returncode == 2 and "site name" in bad.stderr


def _sleeper(*argv: str, children: int = 0) -> list[str]:
    """A Python process that names ``argv`` in its command line (as Flower's programs do), starts
    ``children`` such processes of its own and sleeps."""
    spawn = "".join("subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)', 'flwr-clientapp']); "
                    for _ in range(children))
    return [sys.executable, "-c", f"import subprocess, sys, time; {spawn}time.sleep(120)", *argv]


def test_stop_finds_what_flower_started_and_nothing_else():
    """A recorded process's descendants, its process group and what names it with --parent-pid are stopped;
    a stranger that is no Flower program, and a Flower program started for someone else, are left alone."""
    node = subprocess.Popen(_sleeper("flower-supernode", children=2), start_new_session=True)
    started = [node]
    try:
        started.append(subprocess.Popen(_sleeper("flower-superexec", "--parent-pid", str(node.pid)),
                                        start_new_session=True))
        started.append(subprocess.Popen(_sleeper("flower-superexec", "--parent-pid", "1"), start_new_session=True))
        started.append(subprocess.Popen(_sleeper("not-flower", "--parent-pid", str(node.pid)),
                                        start_new_session=True))
        deadline = time.monotonic() + 30
        while len(found := flower_processes(node.pid)) < 4 and time.monotonic() < deadline:
            time.sleep(0.2)  # the children are still starting
        assert node.pid in found and started[1].pid in found and len(found) == 4, found
        assert found[started[1].pid] == started[1].pid and {found[p] for p in found if p != started[1].pid} == {
            node.pid}  # process group of each: the node's (its children) and the superexec's own
        rec = {"name": "site-a", "role": "supernode", "pid": node.pid}
        assert stop_processes([rec], grace=10) == {"site-a": "stopped"}
        assert node.wait(timeout=10) == -signal.SIGTERM and started[1].wait(timeout=10) == -signal.SIGTERM
        assert not flower_processes(node.pid)
        assert started[2].poll() is None and started[3].poll() is None  # not ours
        assert stop_processes([rec], grace=1) == {"site-a": "not running"}
    finally:
        for proc in started:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def test_run_folder_by_run_id_and_flower_errors_as_json(tmp_path):
    for name in ("20260101-120000-run12", "20260101-120000-run123", "20260101-120000-run4512"):
        (tmp_path / name).mkdir()
    assert find_run_folder(tmp_path, 12) == tmp_path / "20260101-120000-run12"
    assert find_run_folder(tmp_path, 45) is None and find_run_folder(tmp_path / "missing", 12) is None
    # no SuperLink behind the connection: Flower's JSON error, raised with its message
    (tmp_path / "home" / "coordinator").mkdir(parents=True)
    (tmp_path / "home" / "coordinator" / "config.toml").write_text(
        '[superlink]\ndefault = "radfed"\n\n[superlink.radfed]\naddress = "127.0.0.1:9"\ninsecure = true\n')
    with pytest.raises(flower.FlowerError, match="(?i)superlink"):
        flower.runs(tmp_path)


def test_the_log_stream_ends_once_the_superlink_stops_listening_and_not_before(tmp_path, monkeypatch):
    """`radfed deploy run`'s `flwr log --stream` is ended when the SuperLink refuses connections (it closed its
    socket on SIGTERM and would wait about a minute for the stream), not while it listens."""
    import socket
    import threading

    monkeypatch.setattr(flower, "WATCH_EVERY", 0.1)
    listener = socket.create_server(("127.0.0.1", 0))
    write_record(tmp_path, {"name": "superlink", "role": "superlink", "pid": os.getpid(),
                            "control_host": "127.0.0.1", "control_port": listener.getsockname()[1]})
    stream = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    gone, ended = threading.Event(), threading.Event()
    try:
        watcher = threading.Thread(target=flower._watch, args=(tmp_path, stream, gone, ended), daemon=True)
        watcher.start()
        time.sleep(1.0)  # ten looks at a listening SuperLink
        assert stream.poll() is None and not gone.is_set()
        listener.close()  # what uvicorn does first on SIGTERM
        watcher.join(timeout=30)
        assert gone.is_set() and stream.wait(timeout=30) == -signal.SIGTERM
    finally:
        listener.close()
        stream.kill()
        stream.wait()


def test_full_run_with_tls_and_node_authentication(deployment):
    dep = deployment
    link = read_record(dep.dir, "superlink")
    assert "--enable-supernode-auth" in link["cmd"] and "--ssl-certfile" in link["cmd"]
    assert "--insecure" not in link["cmd"] and "insecure" not in (dep.dir / "home/coordinator/config.toml").read_text()
    out = dep.runs / "full"
    code, text = finish(start_run(dep, run_config(dep, "full", **{"query-timeout": 300.0})))
    assert code == 0, text
    folder, doc, events = run_folder(out)
    assert doc["status"] == "completed", doc["error"]
    assert sorted(doc["final"]["sites"]) == sorted(dep.sites) and not doc["dropouts"]
    assert (folder / "report.html").stat().st_size > 1000 and (folder / "model.pt").exists()
    assert f"run {doc['run_id']} completed" in text and str(folder / "audit.jsonl") in text
    assert [e["data"]["status"] for e in events if e["event"] == "run-end"] == ["completed"]

    # the auditor's check, as the guide gives it: pinned key, each site's receipts
    verified = subprocess.run([RADFED, "audit", "verify", str(folder / "audit.jsonl"),
                               "--pubkey", str(dep.pinned_pubkey()), "--receipts", *map(str, dep.sites.values())],
                              cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    # 3 sites x (2 FedAvg rounds' train models + the final model's evaluation: FedAvg evaluates after the last round)
    assert "receipts: 9 model hash(es) in 3 receipts file(s) checked against the log" in verified.stdout
    assert "audit log intact: the log, the run files and the receipts agree" in verified.stdout

    status = json.loads(deploy(dep.dir, "status", "--json").stdout)  # one JSON document, nothing else
    assert [r["status"] for r in status["runs"] if r["run-id"] == str(doc["run_id"])] == ["finished:completed"]
    assert sorted(p["name"] for p in status["processes"] if p["state"] == "running") == sorted(
        [*dep.sites, "fleet-gateway", "superlink"])
    assert [n["status"] for n in status["supernodes"]] == ["online"] * 3 and not status["errors"]
    shown = deploy(dep.dir, "status").stdout
    assert f"run {doc['run_id']}" in shown and "finished:completed" in shown
    assert [line.split()[2] for line in shown.splitlines() if line.startswith("  node ")] == ["online"] * 3


def test_unregistered_and_plaintext_nodes_are_refused(deployment, tmp_path):
    dep = deployment
    address = read_record(dep.dir, "superlink")["address"]
    outsider = tmp_path / "outsider"
    provision(outsider, ["intruder"])  # another CA and a key the SuperLink never registered
    site_dir = str(next(iter(dep.sites.values())))

    # a key that was not registered: refused with exit code 305, never joins
    done = deploy(dep.dir, "supernode", "--name", "intruder", "--site", site_dir,
                  "--key", str(outsider / "keys" / "intruder"), "--wait", "60", check=False)
    assert done.returncode == 1 and "Flower exit code 305" in done.stderr, done.stdout + done.stderr
    assert "SuperNode ID" not in (dep.dir / "logs" / "supernode-intruder.log").read_text()

    refused_supernode(address, tmp_path, tmp_path / "home", "--insecure", site_dir=site_dir)  # plaintext to TLS
    # TLS, a registered key, but a CA that did not sign the SuperLink's certificate
    wrong_ca = refused_supernode(address, tmp_path, tmp_path / "home", "--root-certificates",
                                 str(outsider / "pki" / "ca.crt"), "--auth-supernode-private-key",
                                 str(dep.dir / "keys" / next(iter(dep.sites))), site_dir=site_dir)
    assert "CERTIFICATE_VERIFY_FAILED" in wrong_ca

    # the flwr CLI: plaintext, or TLS without the federation's CA, fails; the coordinator's connection works
    cli_home = tmp_path / "cli"
    cli_home.mkdir()
    (cli_home / "config.toml").write_text(f'[superlink]\ndefault = "plain"\n\n[superlink.plain]\n'
                                          f'address = "{address}"\ninsecure = true\n\n'
                                          f'[superlink.system-ca]\naddress = "{address}"\n')
    for connection in ("plain", "system-ca"):
        listing = subprocess.run([str(BIN / "flwr"), "ls", connection], env=env_for(cli_home),
                                 capture_output=True, text=True, timeout=60, check=False)
        assert listing.returncode != 0, (connection, listing.stdout)
    assert sorted(supernodes(dep).values()) == ["online"] * 3


def test_a_site_that_crashes_mid_run_drops_out_and_the_run_completes(deployment):
    dep = deployment
    ensure_supernodes(dep)
    victim, others = sorted(dep.sites)[2], sorted(dep.sites)[:2]
    out = dep.runs / "crash"
    # query-timeout above Flower's 60 s heartbeat expiry: the SuperLink itself reports the node offline
    proc = start_run(dep, run_config(dep, "crash", harmonization="none", **{
        "select-features": 0, "min-sites": 2, "query-timeout": 120.0}))
    try:
        wait_for_event(proc, out, "round-train")  # round 1 trained with all three
        live = subprocess.run([RADFED, "status", "--output-dir", str(out), "--json"], cwd=REPO, capture_output=True,
                              text=True, timeout=60, check=False)
        assert live.returncode == 0, live.stderr
        during = json.loads(live.stdout)  # the coordinator's view of the run in progress
        assert during["status"] == "running" and during["phase"] in ("training", "calibration", "finished")
        assert during["round"] >= 1 and during["sites"]["taking_part"] == sorted(dep.sites)
        kill_site(dep, victim, signal.SIGKILL)  # a crash: no goodbye to the SuperLink
        code, text = finish(proc)
    finally:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert code == 0, text
    folder, doc, events = run_folder(out)
    assert doc["status"] == "completed", doc["error"]
    assert sorted(doc["final"]["sites"]) == others
    [dropout] = [e["data"] for e in events if e["event"] == "dropout"]
    assert dropout["site"] == victim and dropout["round"] in (1, 2) and "offline" in dropout["reason"], dropout
    assert doc["dropouts"] == [dropout] and f"site {victim} left at round" in text
    after = subprocess.run([RADFED, "status", "--output-dir", str(out)], cwd=REPO, capture_output=True, text=True,
                           timeout=60, check=False)
    assert after.returncode == 0 and f"run {doc['run_id']}: completed" in after.stdout, after.stdout + after.stderr
    assert f"left: {victim} at the " in after.stdout and "offline" in after.stdout
    trained = [sorted(e["data"]["sites"]) for e in events if e["event"] == "round-train"]
    assert trained[0] == sorted(dep.sites) and trained[-1] == others
    check = verify(folder / "audit.jsonl", pubkey=dep.pinned_pubkey(), receipts=[
        d / ".radfed" / "receipts.jsonl" for d in dep.sites.values()])
    assert check.ok, check.reason
    # per site 2 train models + the final evaluation; the victim received at least round 1's model
    assert 2 * 3 + 1 <= check.receipts_checked <= 3 * 3


def test_too_few_sites_left_fails_the_run_cleanly(deployment):
    dep = deployment
    ensure_supernodes(dep)
    victim = sorted(dep.sites)[1]
    out = dep.runs / "too-few"
    proc = start_run(dep, run_config(dep, "too-few", harmonization="none", **{
        "select-features": 0, "min-sites": 3, "query-timeout": 120.0}))
    try:
        wait_for_event(proc, out, "model-init")  # training is about to start
        kill_site(dep, victim, signal.SIGTERM)  # an orderly shutdown: the SuperNode signs off at once
        code, text = finish(proc)
    finally:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert code == 1 and "failed" in text, text
    folder, doc, events = run_folder(out)
    assert doc["status"] == "failed"
    assert "only 2 site(s) remain" in doc["error"] and "fewer than min-sites = 3" in doc["error"], doc["error"]
    [dropout] = [e["data"] for e in events if e["event"] == "dropout"]
    assert dropout["site"] == victim and dropout["round"] == 1 and "offline" in dropout["reason"], dropout
    # what was written so far is intact and complete: a signed chain ending with run-end, and the
    # metrics.json that run-end names
    check = verify(folder / "audit.jsonl", pubkey=dep.pinned_pubkey())
    assert check.ok and check.events["run-end"] == 1, check.reason
    end = events[-1]["data"]
    assert events[-1]["event"] == "run-end" and end["status"] == "failed"
    assert end["metrics_sha256"] == hashlib.sha256((folder / "metrics.json").read_bytes()).hexdigest()


def test_stop_ends_every_flower_process(deployment):
    dep = deployment
    recs = records(dep.dir)
    assert any(r["role"] == "superlink" for r in recs)
    done = deploy(dep.dir, "stop", timeout=150)
    assert "superlink: stopped" in done.stdout, done.stdout
    assert not [r["name"] for r in recs if flower_processes(int(r["pid"]))]
    assert not records(dep.dir)

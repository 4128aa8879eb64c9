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
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from common.split import eligibility_problem
from deploy.layout import read_record, records
from deploy.pki import provision, san_hosts
from deploy.processes import env_for, flower_processes, free_port, stop_processes
from radfed import synth
from radfed.cli import approve_demo_plan
from radfed.launch import overrides_text
from server.audit import load_or_create_key, public_pem, verify

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
RADFED = str(Path(PY).parent / "radfed")
K, PER_CLASS, TEST_FRACTION = 5, 10, 0.3  # 10 per class: two release blocks of k (one trains, one is held out)
RUN_TIMEOUT = 480  # one whole run, including a crashed site's 60 s heartbeat expiry


@dataclass
class Deployment:
    dir: Path
    sites: dict[str, Path]  # site name -> its folder
    runs: Path  # every run's output-dir is a folder in here
    audit_key: Path

    def pinned_pubkey(self) -> Path:
        """The coordinator's audit public key, as an auditor would pin it (not the copy beside the log)."""
        path = self.runs / "coordinator.pub"
        path.write_bytes(public_pem(load_or_create_key(self.audit_key)))
        return path


def deploy(d: Path, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([RADFED, "deploy", *args, "--dir", str(d)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, check=False)
    if check:
        assert done.returncode == 0, f"deploy {' '.join(args)}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


def start_supernode(dep: Deployment, name: str, patience: float = 90) -> None:
    """Start a site's SuperNode; a node that crashed is refused (305) until the SuperLink has marked it
    offline (no heartbeat for up to 60 s), so retry until then."""
    deadline = time.monotonic() + patience
    while True:
        done = deploy(dep.dir, "supernode", "--site", name, "--site-dir", str(dep.sites[name]), "--wait", "60",
                      check=False)
        if done.returncode == 0 or time.monotonic() > deadline or "305" not in done.stderr:
            assert done.returncode == 0, f"SuperNode {name} did not join:\n{done.stdout}\n{done.stderr}"
            return
        time.sleep(5)


def ensure_supernodes(dep: Deployment) -> None:
    for name in dep.sites:
        rec = read_record(dep.dir, name)
        if rec is None or not flower_processes(int(rec["pid"])):
            start_supernode(dep, name)


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
        with suppress(Exception):
            deploy(dep.dir, "stop", "--grace", "25", timeout=150, check=False)
        stop_processes(records(dep.dir), grace=5)  # anything the CLI could not stop


def run_config(dep: Deployment, name: str, **overrides: object) -> dict[str, object]:
    return {"output-dir": str(dep.runs / name), "audit-key": str(dep.audit_key), "num-server-rounds": 2,
            "local-epochs": 1, "min-cases-per-class": K, "test-fraction": TEST_FRACTION,
            "external-validation": "none", **overrides}


def start_run(dep: Deployment, config: dict[str, object]) -> subprocess.Popen:
    """`radfed deploy run` in the background, after every site approved this run's plan."""
    approve_demo_plan(list(dep.sites.values()), config)
    return subprocess.Popen([RADFED, "deploy", "run", "--dir", str(dep.dir), "--run-config", overrides_text(config),
                             "--quiet"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = RUN_TIMEOUT) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"deploy run did not finish within {timeout:.0f}s:\n{out}")
    return proc.returncode, out


def wait_for_event(proc: subprocess.Popen, output_dir: Path, event: str, timeout: float = 300) -> None:
    """Until the run's audit log holds an ``event`` entry."""
    needle = f'"event":"{event}"'
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(needle in p.read_text() for p in output_dir.glob("*/audit.jsonl")):
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended before any {event!r} entry:\n{proc.communicate()[0]}")
        time.sleep(0.5)
    pytest.fail(f"no {event!r} entry in the audit log within {timeout:.0f}s")


def run_folder(output_dir: Path) -> tuple[Path, dict, list[dict]]:
    folders = sorted(output_dir.glob("*-run*"))
    assert len(folders) == 1, folders
    events = [json.loads(line) for line in (folders[0] / "audit.jsonl").read_text().splitlines()]
    return folders[0], json.loads((folders[0] / "metrics.json").read_text()), events


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
    # 3 sites x 2 rounds x 2
    assert "receipts: 12 model hash(es) in 3 receipts file(s) checked against the log" in verified.stdout
    assert "audit log intact: the log, the run files and the receipts agree" in verified.stdout

    status = deploy(dep.dir, "status")
    assert str(doc["run_id"]) in status.stdout and "finished" in status.stdout
    assert status.stdout.count("running") >= 4 and status.stdout.count("online") == 3


def test_unregistered_and_plaintext_nodes_are_refused(deployment, tmp_path):
    dep = deployment
    address = read_record(dep.dir, "superlink")["address"]
    outsider = tmp_path / "outsider"
    provision(outsider, ["intruder"])  # another CA and a key the SuperLink never registered
    site_dir = str(next(iter(dep.sites.values())))

    # a key that was not registered: refused with exit code 305, never joins
    done = deploy(dep.dir, "supernode", "--site", "intruder", "--site-dir", site_dir,
                  "--key", str(outsider / "keys" / "intruder"), "--wait", "60", check=False)
    assert done.returncode == 1 and "Flower exit code 305" in done.stderr, done.stdout + done.stderr
    assert "SuperNode ID" not in (dep.dir / "logs" / "supernode-intruder.log").read_text()

    def supernode(*args: str) -> str:
        cmd = [str(Path(PY).parent / "flower-supernode"), "--superlink", address, "--node-config",
               f"site-dir='{site_dir}'", "--port", str(free_port()), "--max-retries", "2", "--max-wait-time", "15",
               *args]
        # output to a file, not a pipe: the flower-superexec it starts outlives it and would hold a pipe open
        log = tmp_path / f"supernode-{len(list(tmp_path.glob('supernode-*.log')))}.log"
        with log.open("w") as out:
            proc = subprocess.Popen(cmd, env=env_for(tmp_path / "home"), stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            proc.wait(timeout=90)
        finally:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        text = log.read_text(errors="replace")
        assert proc.returncode != 0 and "Exit Code: 305" in text and "SuperNode ID" not in text, text
        return text

    supernode("--insecure")  # plaintext HTTP to the TLS port
    # TLS, a registered key, but a CA that did not sign the SuperLink's certificate
    wrong_ca = supernode("--root-certificates", str(outsider / "pki" / "ca.crt"),
                         "--auth-supernode-private-key", str(dep.dir / "keys" / next(iter(dep.sites))))
    assert "CERTIFICATE_VERIFY_FAILED" in wrong_ca

    # the flwr CLI: plaintext, or TLS without the federation's CA, fails; the coordinator's connection works
    cli_home = tmp_path / "cli"
    cli_home.mkdir()
    (cli_home / "config.toml").write_text(f'[superlink]\ndefault = "plain"\n\n[superlink.plain]\n'
                                          f'address = "{address}"\ninsecure = true\n\n'
                                          f'[superlink.system-ca]\naddress = "{address}"\n')
    for connection in ("plain", "system-ca"):
        listing = subprocess.run([str(Path(PY).parent / "flwr"), "ls", connection], env=env_for(cli_home),
                                 capture_output=True, text=True, timeout=60, check=False)
        assert listing.returncode != 0, (connection, listing.stdout)
    nodes = subprocess.run([str(Path(PY).parent / "flwr"), "supernode", "ls", "radfed", "--format", "json"],
                           env=env_for(dep.dir / "home" / "coordinator"), capture_output=True, text=True, timeout=60,
                           check=True)
    listed = json.loads(nodes.stdout[nodes.stdout.index("{"):])["nodes"]
    assert [n["status"] for n in listed].count("online") == 3 and len(listed) == 3


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
    trained = [sorted(e["data"]["sites"]) for e in events if e["event"] == "round-train"]
    assert trained[0] == sorted(dep.sites) and trained[-1] == others
    check = verify(folder / "audit.jsonl", pubkey=dep.pinned_pubkey(), receipts=[
        d / ".radfed" / "receipts.jsonl" for d in dep.sites.values()])
    assert check.ok, check.reason
    assert 2 * 4 + 1 <= check.receipts_checked <= 3 * 4  # the victim received at least round 1's model


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

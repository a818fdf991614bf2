"""Throwaway mutual-TLS material and a policy for lab tests, made with rdax-admin's functions (no openssl)."""
from __future__ import annotations

import os
from pathlib import Path

from rdax.service.admin import make_ca, make_client_cert, make_node_cert

DOMAIN = "spiffe://rdax.test"
# Who the lab tests are: the default client, a victim and an attacker with identities of their own, and an
# identity the policy does not name.
IDENTITIES = {
    "lab": f"{DOMAIN}/client/lab",
    "victim": f"{DOMAIN}/client/victim",
    "attacker": f"{DOMAIN}/client/attacker",
    "stranger": f"{DOMAIN}/client/stranger",
}

POLICY = f"""
[defaults]
max_sessions = 64
max_watch_streams = 200

[[allow]]
identity = "{IDENTITIES['lab']}"
paths = ["**"]
create = true
access = ["write", "read", "atomic", "flush"]

[[allow]]
identity = "{IDENTITIES['victim']}"
paths = ["victim/**"]
create = true
access = ["write", "read", "atomic", "flush"]

[[allow]]
identity = "{IDENTITIES['attacker']}"
paths = ["attacker/**"]
create = true
access = ["write", "flush", "atomic"]
max_sessions = 40
max_watch_streams = 150
"""


def make_pki(folder: Path, node_ips: list[str]) -> dict[str, object]:
    """A CA, a node certificate for `node_ips`, a client certificate per lab identity, a CA nobody trusts with a
    client certificate of its own, and the policy file. Returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "ca.pem").exists():
        make_ca(folder, name="rdax lab CA")
        make_node_cert(folder, "node", ips=node_ips, dns=["localhost"])
        for who, identity in IDENTITIES.items():
            make_client_cert(folder, identity, name=who)
        rogue = folder / "rogue"
        make_ca(rogue, name="rogue CA")
        make_client_cert(rogue, IDENTITIES["victim"], name="victim")   # the victim's name, from the wrong CA
        (folder / "policy.toml").write_text(POLICY)
    return {"dir": folder, "ca": folder / "ca.pem", "cert": folder / "node.pem", "key": folder / "node.key",
            "policy": folder / "policy.toml"}


def server_args(pki: dict[str, object], audit_log: str | os.PathLike[str] = "-") -> list[str]:
    return ["--tls-cert", str(pki["cert"]), "--tls-key", str(pki["key"]), "--tls-client-ca", str(pki["ca"]),
            "--policy", str(pki["policy"]), "--audit-log", str(audit_log)]


def client_env(pki: dict[str, object], who: str = "lab", env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a client process of identity `who` runs with (RDAX_TLS_*); 'rogue' is the wrong-CA one."""
    folder = Path(pki["dir"])   # type: ignore[arg-type]
    out = dict(os.environ if env is None else env)
    if who == "rogue":
        cert_dir, who = folder / "rogue", "victim"
    else:
        cert_dir = folder
    out.update(RDAX_TLS_CA=str(folder / "ca.pem"), RDAX_TLS_CERT=str(cert_dir / f"{who}.pem"),
               RDAX_TLS_KEY=str(cert_dir / f"{who}.key"))
    return out

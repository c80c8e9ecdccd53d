"""A throwaway CA and a hub certificate for 127.0.0.1, made with trustme."""

from __future__ import annotations

from pathlib import Path


def make_tls_files(folder: Path) -> tuple[Path, Path, Path]:
    """(hub certificate chain, its key, the CA certificate) as PEM files in ``folder``."""
    import trustme

    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    pem, key, ca_pem = folder / "hub.pem", folder / "hub.key", folder / "ca.pem"
    pem.write_bytes(b"".join(c.bytes() for c in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_pem))
    return pem, key, ca_pem

"""Throwaway x509 credentials in QEMU's directory layout, made with ``trustme``.

For the TLS benchmark and the tests (``trustme`` is in the test extras, not a
dependency of the package). A :class:`Authority` is one CA; it writes
``tls-creds-x509`` directories: a server's (``ca-cert.pem``,
``server-cert.pem``, ``server-key.pem``) and a client's (``ca-cert.pem``,
``client-cert.pem``, ``client-key.pem``). Client subjects are made of
``O``, ``OU`` and ``CN`` in that order, so the subject QEMU's authz compares
(see ``vfio_multifd.tls.subject_dn``) reads ``O=...,OU=...,CN=...``.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import trustme

CA_CERT = "ca-cert.pem"


class Authority:
    """One certificate authority and the credential directories it signs."""

    def __init__(self, organization: str = "vfio-multifd test CA") -> None:
        self.ca = trustme.CA(organization_name=organization)

    def server_dir(self, directory: Path, *names: str) -> Path:
        """A server endpoint's directory; its certificate names ``names`` (default:
        127.0.0.1, ::1 and localhost)."""
        directory.mkdir(parents=True, exist_ok=True)
        cert = self.ca.issue_cert(*(names or ("127.0.0.1", "::1", "localhost")))
        self.ca.cert_pem.write_to_path(str(directory / CA_CERT))
        cert.cert_chain_pems[0].write_to_path(str(directory / "server-cert.pem"))
        cert.private_key_pem.write_to_path(str(directory / "server-key.pem"))
        return directory

    def client_dir(
        self,
        directory: Path,
        common_name: str = "source.example.com",
        *,
        organization: str = "Example",
        unit: str = "migration",
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
    ) -> Path:
        """A client endpoint's directory; the certificate's subject is
        ``O=organization,OU=unit,CN=common_name`` (see :func:`client_subject`)."""
        directory.mkdir(parents=True, exist_ok=True)
        cert = self.ca.issue_cert(
            common_name,
            common_name=common_name,
            organization_name=organization,
            organization_unit_name=unit,
            not_before=not_before,
            not_after=not_after,
        )
        self.ca.cert_pem.write_to_path(str(directory / CA_CERT))
        cert.cert_chain_pems[0].write_to_path(str(directory / "client-cert.pem"))
        cert.private_key_pem.write_to_path(str(directory / "client-key.pem"))
        return directory


def client_subject(
    common_name: str = "source.example.com", organization: str = "Example", unit: str = "migration"
) -> str:
    """The subject of :meth:`Authority.client_dir`'s certificate, as ``--tls-authz`` takes it."""
    return f"O={organization},OU={unit},CN={common_name}"


def loopback_credentials(directory: Path) -> tuple[Path, Path]:
    """A server and a client directory from one fresh CA, for 127.0.0.1: (server, client)."""
    authority = Authority()
    return authority.server_dir(directory / "server"), authority.client_dir(directory / "client")

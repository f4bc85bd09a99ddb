"""The sandbox's stand-ins for Microsoft's webhook signing certificates: local CAs, the
signing certificates (good and faulty ones), and the host that serves them as Microsoft does
(the leaf alone at the certificate URL, its issuer at the AIA URL)."""

from __future__ import annotations

import base64
import ssl
import threading
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

GOOD = "pcnotifications-dispatch.microsoft.com"
# Where the issuing CA is published, like Microsoft's http://www.microsoft.com/pkiops/certs/...
ISSUER_PATH = "/pkiops/certs/Microsoft%20Sandbox%20Issuing%20CA.crt"
SLOW_SECONDS = 30.0


class Certificates:
    """The local CAs and the signing certificates, served as Microsoft serves them.

    As with Partner Center, the certificate URL serves the signing certificate alone (DER);
    its issuing CA ("Microsoft Corporation", itself issued by a root standing in for DigiCert's)
    is named in the certificate's Authority Information Access, a plain http URL on the
    sandbox's own issuer host (``issuer_host``), and only the root goes in a trust file.
    Besides: another organization's CA that receivers also trust (for the wrong-issuer fault)
    and a rogue "Microsoft Corporation" CA that nobody trusts."""

    def __init__(self, host: str) -> None:
        import trustme

        self.host = host
        # Not documented by Microsoft: which CAs sign its certificate and where the issuer is
        # published (the certificate says; the sandbox mirrors that shape, with its own root).
        self.root = trustme.CA(organization_name="Sandbox Root Certificate Authority")
        self.microsoft = trustme.CA(
            parent_cert=self.root, organization_name="Microsoft Corporation"
        )
        self.other = trustme.CA(organization_name="Fabrikam Certificate Services")
        self.rogue = trustme.CA(organization_name="Microsoft Corporation")
        self._leaves: dict[str, tuple[bytes, Any]] = {}  # name: (DER, private key)
        self._lock = threading.Lock()
        self.fetched: list[str] = []  # paths asked for, in order (both servers)
        self.delay: dict[str, float] = {"slow": SLOW_SECONDS}
        self._stopping = threading.Event()
        self._servers: list[ThreadingHTTPServer] = []
        self.port = 0  # the https certificate server
        self.issuer_port = 0  # the plain http issuer server (AIA)

    # -- what a receiver must trust

    @property
    def trust_roots_pem(self) -> bytes:
        """The signing roots to trust (webhooks.trust_roots): the root above Microsoft's
        issuing CA, and another organization's CA."""
        return self.root.cert_pem.bytes() + self.other.cert_pem.bytes()

    @property
    def tls_roots_pem(self) -> bytes:
        """The root of the certificate server's TLS certificate (for SSL_CERT_FILE); also the
        root of the signing chain, as DigiCert's root is for Microsoft's."""
        return self.root.cert_pem.bytes()

    @property
    def issuer_host(self) -> str:
        """host:port of the AIA issuer server (for webhooks.issuer_hosts)."""
        return f"{self.host}:{self.issuer_port}"

    def url(self, name: str, host: str | None = None) -> str:
        return f"https://{host or self.host}:{self.port}/cert/{name}.cer"

    def issuer_url(self, host: str | None = None) -> str:
        return f"http://{host or self.host}:{self.issuer_port}{ISSUER_PATH}"

    # -- signing

    def leaf(self, name: str) -> tuple[bytes, Any]:
        """The signing certificate ``name`` (DER) and its private key, made once."""
        with self._lock:
            found = self._leaves.get(name)
        if found is None:
            found = self._issue(name)
            with self._lock:
                found = self._leaves.setdefault(name, found)
        return found

    def _issue(self, name: str) -> tuple[bytes, Any]:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import AuthorityInformationAccessOID, NameOID

        ca = {"wrong-issuer": self.other, "untrusted": self.rogue}.get(name, self.microsoft)
        ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
        ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        now = datetime.now(UTC)
        begins, ends = now - timedelta(days=1), now + timedelta(days=365)
        if name == "expired":
            begins, ends = now - timedelta(days=400), now - timedelta(days=1)
        aia_host = "localhost" if name == "foreign-issuer" else None
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, GOOD)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(begins)
            .not_valid_after(ends)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(GOOD)]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
                critical=False,
            )
        )
        if ca is self.microsoft:  # the issuing CA is found through the AIA, as Microsoft's is
            builder = builder.add_extension(
                x509.AuthorityInformationAccess(
                    [
                        x509.AccessDescription(
                            AuthorityInformationAccessOID.CA_ISSUERS,
                            x509.UniformResourceIdentifier(self.issuer_url(aia_host)),
                        )
                    ]
                ),
                critical=False,
            )
        certificate = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
        return certificate.public_bytes(serialization.Encoding.DER), key

    def sign(self, body: bytes, name: str) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        signature = self.leaf(name)[1].sign(body, padding.PKCS1v15(), hashes.SHA256())
        return base64.b64encode(signature).decode()

    def der(self, name: str) -> bytes:
        return self.leaf(name)[0]

    def issuer_der(self) -> bytes:
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import Encoding

        return x509.load_pem_x509_certificate(self.microsoft.cert_pem.bytes()).public_bytes(
            Encoding.DER
        )

    # -- the servers: https for certificates, plain http for the issuer (as Microsoft's are)

    def start(self) -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.root.issue_cert(self.host, "localhost").configure_cert(context)
        self.port = self._serve(context)
        self.issuer_port = self._serve(None)

    def _serve(self, context: ssl.SSLContext | None) -> int:
        server = ThreadingHTTPServer((self.host, 0), certificate_handler(self))
        server.daemon_threads = True
        server.block_on_close = False
        if context is not None:
            server.socket = context.wrap_socket(server.socket, server_side=True)
        self._servers.append(server)
        threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        return int(server.server_address[1])

    def stop(self) -> None:
        self._stopping.set()
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers = []


def certificate_handler(certificates: Certificates) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            with certificates._lock:
                certificates.fetched.append(self.path)
            if self.path == ISSUER_PATH:
                self._send(200, certificates.issuer_der(), "application/pkix-cert")
                return
            name = self.path.removeprefix("/cert/").removesuffix(".cer")
            if not self.path.startswith("/cert/") or "/" in name or not name:
                self._send(404, b"not found")
                return
            certificates._stopping.wait(certificates.delay.get(name, 0.0))
            self._send(200, certificates.der(name), "application/pkix-cert")

        def _send(self, status: int, body: bytes, kind: str = "text/plain") -> None:
            try:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                pass  # the receiver gave up (its timeout)

    return Handler

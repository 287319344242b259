"""A RUN step that failed verifying a TLS certificate gets a hint on how to hand in the host's CA certificates.

Behind a TLS-inspecting proxy every package manager fails with its own wall of certificate errors;
none of them says that Ember can give RUN steps the host's CA bundle (``--host-ca-certs``). The step's
whole output is watched as it streams (the failure may scroll out of the tail the error keeps), in
bounded memory; the hint is one line at the end of the step's error.
"""

from __future__ import annotations

import re

# What tools print when a certificate does not verify (not when TLS fails for other reasons).
CERT_FAILURE = re.compile(
    "|".join(
        (
            r"CERTIFICATE_VERIFY_FAILED",  # Python's ssl: pip, requests, urllib, poetry
            r"SSL certificate problem",  # curl, libcurl users (git over https with OpenSSL, cargo)
            r"certificate verification failed",  # apt (GnuTLS), git with GnuTLS ("server certificate ...")
            r"UNABLE_TO_GET_ISSUER_CERT(?:_LOCALLY)?",  # npm, yarn (Node's error codes)
            r"SELF_SIGNED_CERT_IN_CHAIN",
            r"DEPTH_ZERO_SELF_SIGNED_CERT",
            r"UNABLE_TO_VERIFY_LEAF_SIGNATURE",
            r"unable to get local issuer certificate",  # OpenSSL's own text (openssl s_client, Ruby, PHP)
            r"self[- ]signed certificate in certificate chain",
            r"x509: certificate signed by unknown authority",  # Go
            r"Unable to locally verify the issuer's authority",  # wget
            r"The certificate is NOT trusted",  # GnuTLS
        )
    ),
    re.IGNORECASE,
)
# Longest text a pattern matches: a match split across two chunks is found with this much carried over.
CARRY = 64

HINT = (
    "hint: this step failed verifying a TLS certificate (a TLS-inspecting proxy?): rebuild with"
    " --host-ca-certs (CLI) or host_ca_certs=true (API) to hand the host's CA certificates to RUN steps,"
    " or set EMBER_BUILD_HOST_CA_CERTS=1 on the daemon to do so for every build"
)


def hint(*, handed_in: bool, ca_path: str, ca_env: tuple[str, ...]) -> str:
    """The line a certificate failure adds to the step's error; ``handed_in``: the step had the host's
    CA bundle at ``ca_path``, named by the variables ``ca_env``."""
    if not handed_in:
        return HINT
    return (
        "hint: this step failed verifying a TLS certificate although the host's CA certificates were handed in"
        f" ({ca_path}, named by {', '.join(ca_env)}): add the proxy's CA to the host's bundle"
        f" (update-ca-certificates), or point a tool that ignores these variables at {ca_path}"
    )


class CertWatch:
    """Fed a step's output as it streams; ``seen`` once it showed a certificate verification failure."""

    def __init__(self) -> None:
        self.seen = False
        self._carry = ""

    def feed(self, text: str) -> None:
        if self.seen:
            return
        window = self._carry + text
        if CERT_FAILURE.search(window):
            self.seen = True
        self._carry = window[-CARRY:]

"""The certificate hint: which step outputs show a certificate verification failure, and the line it adds."""

from __future__ import annotations

import pytest

from ember.agent import ExecResult
from ember.build.buildvm import StepOutput, step_failed
from ember.build.certhint import CARRY, CERT_FAILURE, HINT, CertWatch, hint

# What each tool prints behind a TLS-inspecting proxy (as captured from the tools, hosts shortened).
PIP = """\
WARNING: Retrying (Retry(total=4, connect=None, read=None, redirect=None, status=None)) after connection broken by \
'SSLError(SSLCertVerificationError(1, '[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get \
local issuer certificate (_ssl.c:1006)'))': /simple/flask/
Could not fetch URL https://pypi.org/simple/flask/: There was a problem confirming the ssl certificate: \
HTTPSConnectionPool(host='pypi.org', port=443): Max retries exceeded with url: /simple/flask/ (Caused by \
SSLError(SSLCertVerificationError(1, '[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get \
local issuer certificate (_ssl.c:1006)'))) - skipping
ERROR: Could not find a version that satisfies the requirement flask (from versions: none)
ERROR: No matching distribution found for flask
"""
CURL = """\
curl: (60) SSL certificate problem: unable to get local issuer certificate
More details here: https://curl.se/docs/sslcerts.html

curl failed to verify the legitimacy of the server and therefore could not
establish a secure connection to it. To learn more about this situation and
how to fix it, please visit the web page mentioned above.
"""
APT = """\
Ign:1 https://deb.debian.org/debian bookworm InRelease
Err:1 https://deb.debian.org/debian bookworm InRelease
  Certificate verification failed: The certificate is NOT trusted. The certificate issuer is unknown.  \
Could not handshake: Error in the certificate verification. [IP: 151.101.2.132 443]
Reading package lists...
W: Failed to fetch https://deb.debian.org/debian/dists/bookworm/InRelease  Certificate verification failed: \
The certificate is NOT trusted. The certificate issuer is unknown.  Could not handshake: Error in the certificate \
verification. [IP: 151.101.2.132 443]
W: Some index files failed to download. They have been ignored, or old ones used instead.
E: Unable to locate package ca-certificates
"""
NPM_ISSUER = """\
npm ERR! code UNABLE_TO_GET_ISSUER_CERT_LOCALLY
npm ERR! errno UNABLE_TO_GET_ISSUER_CERT_LOCALLY
npm ERR! request to https://registry.npmjs.org/express failed, reason: unable to get local issuer certificate

npm ERR! A complete log of this run can be found in: /root/.npm/_logs/2024-05-01T10_00_00_000Z-debug-0.log
"""
NPM_SELF_SIGNED = """\
npm error code SELF_SIGNED_CERT_IN_CHAIN
npm error errno SELF_SIGNED_CERT_IN_CHAIN
npm error request to https://registry.npmjs.org/express failed, reason: self-signed certificate in certificate chain
"""
OPENSSL = """\
depth=1 C = US, O = Corp, CN = Corp Inspection CA
verify error:num=20:unable to get local issuer certificate
verify return:1
40C7D2F5A17F0000:error:0A000086:SSL routines:tls_post_process_server_certificate:certificate verify failed:\
../ssl/statem/statem_clnt.c:1889:
"""
GIT_GNUTLS = """\
Cloning into 'repo'...
fatal: unable to access 'https://github.com/corp/repo.git/': server certificate verification failed. \
CAfile: none CRLfile: none
"""
GIT_OPENSSL = """\
Cloning into 'repo'...
fatal: unable to access 'https://github.com/corp/repo.git/': SSL certificate problem: self-signed certificate in \
certificate chain
"""
WGET = """\
--2024-05-01 10:00:00--  https://example.com/tool.tar.gz
Resolving example.com (example.com)... 93.184.216.34
Connecting to example.com (example.com)|93.184.216.34|:443... connected.
ERROR: cannot verify example.com's certificate, issued by 'CN=Corp Inspection CA,O=Corp':
  Unable to locally verify the issuer's authority.
To connect to example.com insecurely, use `--no-check-certificate'.
"""
GO = """\
go: github.com/pkg/errors@v0.9.1: Get "https://proxy.golang.org/github.com/pkg/errors/@v/v0.9.1.mod": \
tls: failed to verify certificate: x509: certificate signed by unknown authority
"""

CERT_OUTPUTS = {
    "pip": PIP,
    "curl": CURL,
    "apt": APT,
    "npm-issuer": NPM_ISSUER,
    "npm-self-signed": NPM_SELF_SIGNED,
    "openssl": OPENSSL,
    "git-gnutls": GIT_GNUTLS,
    "git-openssl": GIT_OPENSSL,
    "wget": WGET,
    "go": GO,
}

# Failures that are not about certificates (some about TLS or networks): no hint.
OTHER_OUTPUTS = {
    "pip-no-version": "ERROR: Could not find a version that satisfies the requirement flsk (from versions: none)\n"
    "ERROR: No matching distribution found for flsk\n",
    "pip-offline": "WARNING: Retrying (Retry(total=4, ...)) after connection broken by 'NewConnectionError("
    "'<pip._vendor.urllib3.connection.HTTPSConnection object at 0x7f>: Failed to establish a new connection: "
    "[Errno 101] Network is unreachable')': /simple/flask/\n",
    "curl-dns": "curl: (6) Could not resolve host: example.com\n",
    "curl-handshake": "curl: (35) OpenSSL/3.0.11: error:0A000410:SSL routines::sslv3 alert handshake failure\n",
    "apt-missing": "E: Unable to locate package flsk\n",
    "compiler": "main.c:3:5: error: 'x' undeclared (first use in this function)\nmake: *** [Makefile:2: all] Error 1\n",
    "npm-404": "npm ERR! code E404\nnpm ERR! 404 Not Found - GET https://registry.npmjs.org/expresss - Not found\n",
    "talks-about-certs": "generating certificate for localhost... done\nverifying certificates: ok\n"
    "Error: tests failed\n",
}


def seen(text: str, chunk: int = 0) -> bool:
    watch = CertWatch()
    pieces = [text[i : i + chunk] for i in range(0, len(text), chunk)] if chunk else [text]
    for piece in pieces:
        watch.feed(piece)
    return watch.seen


@pytest.mark.parametrize("tool", sorted(CERT_OUTPUTS))
def test_each_tools_certificate_failure_is_seen(tool: str) -> None:
    assert seen(CERT_OUTPUTS[tool])


@pytest.mark.parametrize("tool", sorted(OTHER_OUTPUTS))
def test_other_failures_are_not(tool: str) -> None:
    assert not seen(OTHER_OUTPUTS[tool])


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_a_failure_split_across_chunks_is_seen(chunk: int) -> None:
    for tool, text in CERT_OUTPUTS.items():
        assert seen(text, chunk), (tool, chunk)
    for text in OTHER_OUTPUTS.values():
        assert not seen(text, chunk)


def test_a_failure_long_before_the_end_is_seen() -> None:
    """The wall of output after the failure pushes it out of the tail the error keeps; the watch still saw it."""
    assert seen(PIP + "building wheel...\n" * 10_000, 4096)


def test_every_pattern_fits_in_the_carry() -> None:
    for alternative in CERT_FAILURE.pattern.split("|"):
        literal = alternative.replace("(?:_LOCALLY)?", "_LOCALLY").replace("[- ]", "-").replace("\\", "")
        assert len(literal) <= CARRY, alternative


def failed(text: str, exit_code: int = 1) -> StepOutput:
    return StepOutput(ExecResult(exit_code=exit_code, signal=0, timed_out=False), text)


def test_the_hint_is_the_last_line_of_the_step_error() -> None:
    message = str(step_failed("step at line 2 (RUN pip install flask)", failed(PIP), HINT))
    lines = message.splitlines()
    assert lines[-1] == HINT and "ERROR: No matching distribution found for flask" in lines[-2]
    assert "--host-ca-certs" in HINT and "host_ca_certs=true" in HINT and "EMBER_BUILD_HOST_CA_CERTS=1" in HINT
    assert "hint" not in str(step_failed("step at line 2 (RUN make)", failed(OTHER_OUTPUTS["compiler"])))


def test_when_the_certificates_were_handed_in_the_hint_says_what_else_to_do() -> None:
    assert hint(handed_in=False, ca_path="/dev/ca.crt", ca_env=("SSL_CERT_FILE",)) == HINT
    line = hint(handed_in=True, ca_path="/dev/ca.crt", ca_env=("SSL_CERT_FILE", "PIP_CERT"))
    assert "--host-ca-certs" not in line and "/dev/ca.crt" in line and "SSL_CERT_FILE, PIP_CERT" in line
    assert "update-ca-certificates" in line

"""AWS API benchmark: boto3 driving Ember's AWS Lambda MicroVMs API on this machine; prints JSON (last line).

    sudo .venv/bin/python bench/aws_api.py [--launches 12] [--requests 200]

Starts its own daemon (fresh data directory, a TCP listener for boto3, ``file://`` code artifacts under a
directory of its own), makes a tenant and a key, and creates an image the AWS way: CreateMicrovmImage from a
zip (a Dockerfile at its root and a small Python app answering the AWS hooks; ``file://`` under the tenant's
account id), polled until CREATED. Then:

- ``run_to_first_response_ms``: RunMicrovm, CreateMicrovmAuthToken and the app's first HTTP 200 through the
  VM's endpoint (``X-aws-proxy-auth``, a new connection), split into the three calls; the VM is terminated
  after each round and the warm pool given time to refill.
- ``sigv4``: what verifying a signature costs: Ember's verification of a request botocore signed (in process,
  per call), and GetMicrovm through boto3 beside the same read through Ember's own API (``GET /v1/vms/ID``
  with a bearer key, httpx, a kept-alive connection), both over the TCP listener.

Every VM is terminated at the end, also on Ctrl-C or a failure.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import http.client
import io
import json
import sys
import time
import timeit
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
import httpx
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials

from ember.aws.sigv4 import SignedRequest, parse, verify
from ember.sdk import Client

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import log, machine, own_daemon, pcts, prepare_base
from bench.serverless import APP  # the same app: it answers GET and the hooks (POST) alike
from tests.awsfixtures import REGION, new_aws_tenant
from tests.conftest import free_port

HOOKS = "/aws/lambda-microvms/runtime/v1/"
DOCKERFILE = """\
FROM ember:debian-python3
COPY app.py /app/app.py
CMD ["python3", "/app/app.py"]
"""
ROLE = "arn:aws:iam::123456789012:role/ember-bench"


def code_zip() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("Dockerfile", DOCKERFILE)
        z.writestr("app.py", APP)
    return out.getvalue()


def create_image(lam: Any, uri: str) -> tuple[str, float]:
    started = time.monotonic()
    image = lam.create_microvm_image(
        name="bench", baseImageArn=f"arn:aws:lambda:{REGION}:aws:microvm-image:debian", buildRoleArn=ROLE,
        codeArtifact={"uri": uri},
        hooks={"port": 8080, "microvmImageHooks": {"ready": "ENABLED", "validate": "ENABLED"}},
    )  # fmt: skip
    while (state := lam.get_microvm_image(imageIdentifier=image["imageArn"])["state"]) == "CREATING":
        time.sleep(0.5)
    if state != "CREATED":
        raise SystemExit(f"the image was not built: {state}")
    return image["imageArn"], time.monotonic() - started


def first_response(endpoint: str, token: str) -> int:
    url = urlsplit(endpoint)
    host = url.hostname or "localhost"
    if host.endswith(".localhost"):  # as a browser does (this host's resolver may not know *.localhost)
        host = "127.0.0.1"
    conn = http.client.HTTPConnection(host, url.port or 80, timeout=60)
    try:
        conn.request("GET", "/", headers={"Host": url.netloc, "X-aws-proxy-auth": token})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def launches(lam: Any, image_arn: str, rounds: int) -> dict[str, Any]:
    total, run, token, request = [], [], [], []
    for i in range(rounds):
        time.sleep(1.0)  # the warm pool refills
        t0 = time.perf_counter()
        vm = lam.run_microvm(imageIdentifier=image_arn, ingressNetworkConnectors=["ALL_INGRESS"])
        t1 = time.perf_counter()
        parts = lam.create_microvm_auth_token(
            microvmIdentifier=vm["microvmId"], expirationInMinutes=10, allowedPorts=[{"port": 8080}]
        )["authToken"]
        t2 = time.perf_counter()
        status = first_response(vm["endpoint"], parts["X-aws-proxy-auth"])
        t3 = time.perf_counter()
        lam.terminate_microvm(microvmIdentifier=vm["microvmId"])
        if status != 200:
            raise SystemExit(f"round {i}: the app answered {status}")
        total.append((t3 - t0) * 1000)
        run.append((t1 - t0) * 1000)
        token.append((t2 - t1) * 1000)
        request.append((t3 - t2) * 1000)
        log(f"round {i}: {total[-1]:.0f} ms (run {run[-1]:.0f}, token {token[-1]:.0f}, request {request[-1]:.0f})")
    return {"total": pcts(total), "run_microvm": pcts(run), "auth_token": pcts(token), "http_request": pcts(request)}


def verification_us(endpoint: str, access_key_id: str, secret: str) -> dict[str, float]:
    """Ember's SigV4 verification alone, of a GetMicrovm request as botocore signs it."""
    aws = AWSRequest(method="GET", url=f"{endpoint}/2025-09-09/microvms/vm-0123456789ab", data=b"")
    SigV4Auth(Credentials(access_key_id, secret), "lambda", REGION).add_auth(aws)
    url = urlsplit(aws.url)
    headers = (*((k.lower(), str(v)) for k, v in aws.headers.items()), ("host", url.netloc))
    signed = SignedRequest("GET", url.path, url.query, headers, b"")

    def check() -> None:
        verify(signed, parse(signed), secret)

    n = 2000
    best = min(timeit.repeat(check, number=n, repeat=5)) / n
    return {"verify_us": round(best * 1e6, 1)}


def reads(lam: Any, endpoint: str, api_key: str, vm_id: str, n: int) -> dict[str, Any]:
    """GetMicrovm (boto3: signs, sends, verifies, parses) beside GET /v1/vms/ID (a bearer key)."""
    aws, own = [], []
    with httpx.Client(base_url=endpoint, headers={"Authorization": f"Bearer {api_key}"}) as http:
        for _ in range(n):
            t0 = time.perf_counter()
            lam.get_microvm(microvmIdentifier=vm_id)
            t1 = time.perf_counter()
            http.get(f"/v1/vms/{vm_id}").raise_for_status()
            t2 = time.perf_counter()
            aws.append((t1 - t0) * 1000)
            own.append((t2 - t1) * 1000)
    return {"get_microvm_boto3_ms": pcts(aws), "get_vm_ember_api_ms": pcts(own)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launches", type=int, default=12)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()

    settings, daemon = own_daemon("ember-bench-aws-", 910_000)
    artifacts = settings.data_dir.parent / f"{settings.data_dir.name}-artifacts"
    artifacts.mkdir(mode=0o700)
    settings = dataclasses.replace(settings, listen=f"127.0.0.1:{free_port()}", aws_file_artifact_root=str(artifacts))
    daemon.settings = settings
    endpoint = f"http://{settings.listen}"
    daemon.start()
    vms: list[str] = []
    lam: Any = None
    try:
        with Client(settings=settings) as admin:
            accel = prepare_base(admin)
            tenant = new_aws_tenant(admin, prefix="bench")
        lam = boto3.client(
            "lambda-microvms", endpoint_url=endpoint, region_name=REGION,
            aws_access_key_id=tenant.access_key_id, aws_secret_access_key=tenant.secret_access_key,
            config=Config(retries={"max_attempts": 1}, read_timeout=300),
        )  # fmt: skip
        code = artifacts / tenant.account_id / "app.zip"  # a tenant's artifacts: under its account id
        code.parent.mkdir()
        code.write_bytes(code_zip())
        image_arn, build_s = create_image(lam, f"file://{code}")
        log(f"image created in {build_s:.1f} s")
        result: dict[str, Any] = {"machine": machine(), **accel, "image_create_s": round(build_s, 1)}
        result["run_to_first_response_ms"] = launches(lam, image_arn, args.launches)
        vm = lam.run_microvm(imageIdentifier=image_arn)["microvmId"]
        vms.append(vm)
        result["sigv4"] = {
            **verification_us(endpoint, tenant.access_key_id, tenant.secret_access_key),
            **reads(lam, endpoint, tenant.api_key, vm, args.requests),
        }
        print(json.dumps(result))
    finally:
        for vm in vms:
            with contextlib.suppress(Exception):
                lam.terminate_microvm(microvmIdentifier=vm)
        daemon.stop()


if __name__ == "__main__":
    main()

"""Real image builds: Dockerfile -> build micro-VM -> app started and snapshotted running."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ember.host.binaries import compile_static
from ember.sdk import ApiError, Client, Request
from tests.conftest import build, remove_quietly

pytestmark = pytest.mark.vm

APP = r"""
import http.server, os
STATE = {"ready_calls": 0, "gets": 0}
open("/app/pid", "w").write(str(os.getpid()))
print("app starting", flush=True)

class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        if self.path == "/ember/v1/ready":
            STATE["ready_calls"] += 1
        self.send_response(200); self.end_headers()
    def do_GET(self):
        STATE["gets"] += 1
        body = json.dumps({"pid": os.getpid(), **STATE, "greeting": open("greeting.txt").read().strip(),
                           "secret_here": os.path.exists("secret.txt")})
        self.send_response(200); self.end_headers(); self.wfile.write(body.encode())

import json
import socket
http.server.HTTPServer(("127.0.0.1", 8080), H).serve_forever()
"""

DOCKERFILE = """\
FROM ember:debian-python3
ARG GREETING=hello
ENV APP_DIR=/app WHO=${GREETING:-nobody}
WORKDIR ${APP_DIR}
COPY *.py ./
COPY secret.txt ./
RUN <<EOT
echo "$WHO from $APP_DIR" > greeting.txt
EOT
LABEL ember.ready.http=8080
CMD ["python3", "/app/app.py"]
"""

GET = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:8080/').read().decode())"


def python_ctx(root: Path) -> Path:
    root.mkdir()
    (root / "Dockerfile").write_text(DOCKERFILE)
    (root / "app.py").write_text(APP)
    (root / "secret.txt").write_text("do not ship\n")
    (root / ".dockerignore").write_text("secret.txt\n")
    return root


def test_python_app_is_running_in_launched_vms(client: Client, tmp_path: Path) -> None:
    ctx = python_ctx(tmp_path / "ctx")
    build(client, ctx, "webapp", build_args={"GREETING": "hi"})  # .dockerignore wins over COPY
    failed = client.send(Request("GET", "/v1/images/webapp:1"))
    assert failed["state"] == "CREATE_FAILED" and "secret.txt" in failed["error"]
    (ctx / "Dockerfile").write_text(DOCKERFILE.replace("COPY secret.txt ./\n", ""))

    image, logs = build(client, ctx, "webapp", build_args={"GREETING": "hi"})
    assert image["state"] == "CREATED", logs
    assert image["name"] == "webapp:2" and image["config"]["workdir"] == "/app"
    assert "WHO=hi" in image["config"]["env"] and image["build"]["readiness"] == "http-hook"

    vm_id = client.vms.run("webapp").id  # the newest version
    try:
        first = json.loads(client.vms.exec(vm_id, ["python3", "-c", GET]).stdout)
        second = json.loads(client.vms.exec(vm_id, ["python3", "-c", GET]).stdout)
        pid = int(client.vms.exec(vm_id, ["cat", "/app/pid"]).stdout)
        # the process started during the build, with what it had in memory then
        assert first["pid"] == second["pid"] == pid
        # ready once at build, and once more if a pool clone warmed the app before this launch took it
        assert first["ready_calls"] in (1, 2) and (first["gets"], second["gets"]) == (1, 2)
        assert first["greeting"] == "hi from /app" and first["secret_here"] is False
        with pytest.raises(ApiError) as busy:
            client.send(Request("DELETE", "/v1/images/webapp:2"))
        assert busy.value.status == 409 and vm_id in str(busy.value)
    finally:
        remove_quietly(client, vm_id)

    again, logs = build(client, ctx, "webapp", build_args={"GREETING": "hi"})
    assert again["state"] == "CREATED" and again["name"] == "webapp:3"
    assert all(s["cached"] for s in again["build"]["steps"]), logs
    assert again["build"]["snapshot_of"] == "webapp:2", logs  # nothing changed: no new cold boot
    client.send(Request("DELETE", "/v1/images/webapp:2"))  # the copy stands on its own
    vm_id = client.vms.run("webapp:3").id
    try:
        same = json.loads(client.vms.exec(vm_id, ["python3", "-c", GET]).stdout)
        assert same["pid"] == pid and same["gets"] == 1
    finally:
        remove_quietly(client, vm_id)
    (ctx / "app.py").write_text(APP + "\n# changed\n")
    changed, logs = build(client, ctx, "webapp", build_args={"GREETING": "hi"})
    steps = {s["text"].split()[0] + str(s["line"]): s["cached"] for s in changed["build"]["steps"]}
    assert steps["WORKDIR4"] and not steps["COPY5"] and not steps["RUN6"], logs
    client.send(Request("DELETE", "/v1/images/webapp:3"))
    assert "CREATED webapp:4" in client.text(Request("GET", "/v1/images/webapp/logs"))


def test_failing_run_and_bad_dockerfiles(client: Client, tmp_path: Path) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM ember:debian-python3\nRUN echo about to fail && exit 7\n")
    result, _ = build(client, ctx, "broken")
    assert result["state"] == "CREATE_FAILED"
    assert "line 2" in result["failed_step"] and "exit code 7" in result["error"]
    assert "about to fail" in result["error"]
    assert "CREATE_FAILED" in client.text(Request("GET", "/v1/images/broken:1/logs"))

    (ctx / "Dockerfile").write_text("FROM ember:debian-python3\nFROBNICATE now\n")
    with pytest.raises(ApiError) as info:
        build(client, ctx, "unknown")
    assert info.value.status == 400 and "line 2" in str(info.value) and "FROBNICATE" in str(info.value)
    names = [i["name"] for i in client.send(Request("GET", "/v1/images"))]
    assert not any(n.startswith("unknown") for n in names)


def test_app_that_never_gets_ready_fails_at_the_timeout(client: Client, tmp_path: Path) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(
        'FROM ember:debian-python3\nEXPOSE 8081\nCMD ["sh", "-c", "echo warming up forever; sleep 1000"]\n'
    )
    result, _ = build(client, ctx, "sleepy", ready_timeout=4)
    assert result["state"] == "CREATE_FAILED" and result["failed_step"] == "ready"
    assert "not ready after 4 s" in result["error"] and "warming up forever" in result["error"]


SERVER_C = r"""
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
int main(void) {
    int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(9000)};
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 8)) return 1;
    for (unsigned n = 1;; n++) {
        int c = accept(s, 0, 0);
        char msg[64];
        int len = 0;
        for (unsigned v = n; v; v /= 10) len++;
        for (int i = len - 1, v = (int)n; i >= 0; i--, v /= 10) msg[i] = (char)('0' + v % 10);
        msg[len++] = '\n';
        if (write(c, msg, (size_t)len) < 0) return 2;
        close(c);
    }
}
"""


def test_scratch_static_binary_from_a_multi_stage_build(client: Client, tmp_path: Path) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    compile_static(SERVER_C.encode(), ctx / "server")
    (ctx / "Dockerfile").write_text(
        "FROM ember:debian-python3 AS stage\nCOPY server /out/bin/server\nRUN chmod 0755 /out/bin/server\n"
        'FROM scratch\nCOPY --from=stage /out/bin/server /server\nEXPOSE 9000\nENTRYPOINT ["/server"]\n'
    )
    image, logs = build(client, ctx, "static")
    assert image["state"] == "CREATED", logs
    assert image["build"]["readiness"] == "tcp-ports"
    vm_id = client.vms.run("static:1").id
    try:
        # no shell, no python in this image: ask through the agent's own file listing
        names = {e["name"] for e in client.send(Request("GET", f"/v1/vms/{vm_id}/ls", {"path": "/"}))["entries"]}
        assert "server" in names and "bin" not in names and "usr" not in names
    finally:
        remove_quietly(client, vm_id)

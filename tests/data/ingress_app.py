"""The ingress tests' app, run inside a VM (python3, standard library only): serves the ports given.

GET /headers      the request's path and headers as JSON
POST /upload      reads the body (Content-Length or chunked) and answers its size and SHA-256
GET /download?n=N N bytes (a repeating pattern), chunked
GET /close-early  a head promising 1 MB, 1000 bytes, then the connection closes
GET /close-now    closes without answering
GET /slow         answers after 60 s
GET /ws           WebSocket echo (text and binary frames; a close frame ends it)
"""

import base64
import hashlib
import json
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PATTERN = bytes(range(256)) * 256


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    wbufsize = 1 << 16  # a head and a small body in one segment (flushed after every request)

    def log_message(self, *args):
        pass

    def answer(self, body, status=200, kind="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        path = self.path.split("?")[0]
        if path == "/ws":
            return self.websocket()
        if path == "/close-early":
            self.send_response(200)
            self.send_header("Content-Length", "1000000")
            self.end_headers()
            self.wfile.write(b"x" * 1000)
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        if path == "/close-now":
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        if path == "/slow":
            time.sleep(60)
            return self.answer(b"late")
        if path == "/download":
            n = int(self.path.partition("n=")[2])
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            while n:
                piece = PATTERN[: min(n, len(PATTERN))]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                n -= len(piece)
            self.wfile.write(b"0\r\n\r\n")
            return
        seen = {
            "path": self.path,
            "port": self.server.server_address[1],
            "headers": [[k.lower(), v] for k, v in self.headers.items()],
        }
        self.answer(json.dumps(seen).encode())

    def do_POST(self):
        digest, size = hashlib.sha256(), 0
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                n = int(self.rfile.readline().strip().split(b";")[0], 16)
                if n == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                data = self.rfile.read(n)
                self.rfile.readline()
                digest.update(data)
                size += len(data)
        else:
            left = int(self.headers.get("Content-Length", "0"))
            while left:
                data = self.rfile.read(min(left, 65536))
                digest.update(data)
                size += len(data)
                left -= len(data)
        self.answer(json.dumps({"size": size, "sha256": digest.hexdigest()}).encode())

    def websocket(self):
        key = self.headers["Sec-WebSocket-Key"]
        accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept.decode())
        self.end_headers()
        self.wfile.flush()
        while True:
            head = self.rfile.read(2)
            if len(head) < 2:
                break
            opcode, n = head[0] & 0x0F, head[1] & 0x7F
            if n == 126:
                n = int.from_bytes(self.rfile.read(2), "big")
            elif n == 127:
                n = int.from_bytes(self.rfile.read(8), "big")
            mask = self.rfile.read(4)
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(self.rfile.read(n)))
            length = bytes([n]) if n < 126 else bytes([126]) + n.to_bytes(2, "big")
            self.wfile.write(bytes([0x80 | opcode]) + length + data)
            self.wfile.flush()
            if opcode == 8:
                break
        self.close_connection = True


for port in sys.argv[1:]:
    server = ThreadingHTTPServer(("127.0.0.1", int(port)), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
open("/tmp/ingress-app.ready", "w").close()
threading.Event().wait()

"""A stand-in for the Anthropic Messages API on loopback, so the real Claude Code CLI can run a turn
offline: the first request that offers `tool` is answered with a call of it, every other with "done".
`requests` keeps each request body: what the model would have read, tool definitions and results."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Fake:
    def __init__(self, tool, args):
        self.tool, self.args, self.requests = tool, args, []
        outer = self
        class H(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
                outer.requests.append((self.path, body))
                if "count_tokens" in self.path:
                    return self.reply({"input_tokens": 10})
                msgs = body.get("messages", [])
                names = [t.get("name") for t in body.get("tools", [])]
                last = msgs[-1]["content"] if msgs else ""
                has_result = isinstance(last, list) and any(b.get("type") == "tool_result" for b in last)
                if outer.tool in names and not has_result:
                    block = {"type": "tool_use", "id": "toolu_01", "name": outer.tool, "input": {}}
                    self.stream(block, json.dumps(outer.args), "tool_use", body)
                else:
                    self.stream({"type": "text", "text": ""}, "done", "end_turn", body)
            def reply(self, obj):
                data = json.dumps(obj).encode()
                self.send_response(200); self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data))); self.end_headers(); self.wfile.write(data)
            def stream(self, block, payload, stop, body):
                if not body.get("stream"):
                    b = dict(block)
                    if b["type"] == "tool_use": b["input"] = json.loads(payload)
                    else: b["text"] = payload
                    return self.reply({"id": "msg_1", "type": "message", "role": "assistant", "model": body.get("model"),
                                       "content": [b], "stop_reason": stop, "stop_sequence": None,
                                       "usage": {"input_tokens": 1, "output_tokens": 1}})
                self.send_response(200); self.send_header("content-type", "text/event-stream"); self.end_headers()
                def ev(name, data):
                    self.wfile.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
                ev("message_start", {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant",
                    "model": body.get("model"), "content": [], "stop_reason": None, "stop_sequence": None,
                    "usage": {"input_tokens": 1, "output_tokens": 1}}})
                ev("content_block_start", {"type": "content_block_start", "index": 0, "content_block": block})
                delta = {"type": "input_json_delta", "partial_json": payload} if block["type"] == "tool_use" \
                    else {"type": "text_delta", "text": payload}
                ev("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})
                ev("content_block_stop", {"type": "content_block_stop", "index": 0})
                ev("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                                     "usage": {"output_tokens": 1}})
                ev("message_stop", {"type": "message_stop"})
                self.wfile.flush()
            def log_message(self, *a): pass
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def tool_results(self):
        out = []
        for _, body in self.requests:
            for m in body.get("messages", []):
                if isinstance(m["content"], list):
                    out += [b for b in m["content"] if b.get("type") == "tool_result"]
        return out

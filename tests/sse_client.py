#!/usr/bin/env python3
"""A client of Keel's OpenAI-style streaming API written as an HTTP client would be: Python's
standard http.client, server-sent events read line by line, and on a broken stream a reconnect
to the next endpoint with Last-Event-ID and the same request (tests/openai_http_test.cpp).

Prints one JSON line per event as it comes ({"id": ..., "data": ...}), then one line
{"result": {...}}: the text, the event ids, the reconnects, finish_reason and usage.
Exits 0 when the stream ended with [DONE], 1 otherwise."""

import argparse
import http.client
import json
import sys
import time


def events(response):
    """Yields (id, data) per event; ends at the end of the body."""
    event_id, data = None, []
    while True:
        line = response.readline()
        if not line:
            return
        line = line.decode("utf-8").rstrip("\r\n")
        if line == "":
            if data:
                yield event_id, "\n".join(data)
            event_id, data = None, []
        elif line.startswith("id:"):
            event_id = line[3:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoints", required=True, help="HOST:PORT[,HOST:PORT...], tried in turn")
    ap.add_argument("--path", default="/v1/chat/completions")
    ap.add_argument("--body", required=True, help="a file with the request's JSON")
    ap.add_argument("--key", default="")
    ap.add_argument("--session", default="", help="Keel-Session: a conversation to continue")
    ap.add_argument("--retry-for", type=float, default=60.0)
    args = ap.parse_args()
    endpoints = args.endpoints.split(",")
    body = open(args.body, "rb").read()

    text, ids, reconnects = [], [], 0
    last_id, finish, usage, done, error, session = None, None, None, False, None, ""
    at, broke_at = 0, None
    while not done:
        host, port = endpoints[at % len(endpoints)].rsplit(":", 1)
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if args.key:
            headers["Authorization"] = "Bearer " + args.key
        if args.session:
            headers["Keel-Session"] = args.session
        if last_id is not None:
            headers["Last-Event-ID"] = last_id
        try:
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
            conn.request("POST", args.path, body=body, headers=headers)
            response = conn.getresponse()
            if response.status != 200:
                error = {"status": response.status, "body": response.read().decode("utf-8")}
                if response.status in (502, 503) and last_id is not None:
                    raise ConnectionError("status %d" % response.status)
                break
            session = response.getheader("Keel-Session", session)
            broke_at = None
            for event_id, data in events(response):
                print(json.dumps({"id": event_id, "data": data}), flush=True)
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    error = chunk["error"]
                    break
                if event_id is not None:
                    ids.append(event_id)
                    last_id = event_id
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices", []):
                    piece = choice.get("delta", {}).get("content") if "delta" in choice else choice.get("text")
                    if piece:
                        text.append(piece)
                    if choice.get("finish_reason"):
                        finish = choice["finish_reason"]
            if done or error:
                break
            raise ConnectionError("the stream ended before [DONE]")
        except (OSError, http.client.HTTPException) as e:
            if last_id is None and error is None and broke_at is None and at >= len(endpoints):
                error = {"connect": str(e)}
                break
            broke_at = broke_at or time.monotonic()
            if time.monotonic() - broke_at > args.retry_for:
                error = {"gave_up": str(e)}
                break
            reconnects += 1
            at += 1
            time.sleep(0.05)
    result = {"text": "".join(text), "ids": ids, "reconnects": reconnects, "finish_reason": finish,
              "usage": usage, "done": done, "error": error, "session": session}
    print(json.dumps({"result": result}), flush=True)
    return 0 if done else 1


if __name__ == "__main__":
    sys.exit(main())

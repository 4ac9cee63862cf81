"""`kvmesh generate`: stream a generation from a router to stdout.

    kvmesh generate --router 127.0.0.1:50051 --prompt "Once upon a time" --max-tokens 64
    kvmesh generate --router R --chat --system "Be brief." --user "Hi" --assistant "Hello!" --user "A story?"
    kvmesh generate --router R --chat --messages '[{"role": "user", "content": "Hi"}]' --json

Text goes to stdout as it arrives; `--json` prints one JSON object per response instead (text delta,
token records, finish reason, usage). On an error the gRPC status name and message go to stderr and
the exit code is the status's number (e.g. 3 for INVALID_ARGUMENT, 14 for UNAVAILABLE). Imports no
torch: only grpc and the generated stubs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import grpc

from kvmesh.v1 import common_pb2, router_pb2, router_pb2_grpc

EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what `yes | head` leaves for `yes`


class _MessageAction(argparse.Action):
    """--system/--user/--assistant append (role, text) to one ordered list."""

    def __call__(self, parser, namespace, values, option_string=None):
        messages = getattr(namespace, "messages_list", None) or []
        messages.append((self.dest, values))
        namespace.messages_list = messages


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text through a kvmesh router", description=__doc__)
    p.add_argument("--router", default="127.0.0.1:50051", help="router HOST:PORT")
    p.add_argument("--prompt", default=None, help="prompt text (without --chat)")
    p.add_argument("--token-ids", default=None, help="prompt as comma-separated token ids")
    p.add_argument("--chat", action="store_true", help="send chat messages, rendered with the model's template")
    for role in ("system", "user", "assistant"):
        p.add_argument(f"--{role}", dest=role, action=_MessageAction, default=argparse.SUPPRESS,
                       help=f"with --chat: a {role} message (repeatable, kept in order)")
    p.add_argument("--messages", default=None, help='with --chat: JSON list of {"role": ..., "content": ...}')
    p.add_argument("--model", default="", help="model name (default: the router's only model)")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens to generate at most (default: the router's)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature, 0 = greedy (default 1.0)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1] (default 1.0: off)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens (default: off)")
    p.add_argument("--seed", type=int, default=None, help="per-request seed: the same seed gives the same text")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--include-stop", action="store_true", help="keep the matched stop string in the text")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the model's end-of-sequence")
    p.add_argument("--logprobs", type=int, default=None, metavar="K",
                   help="return logprobs and K top candidates per token (implies --json records)")
    p.add_argument("--json", action="store_true", help="print one JSON object per response")
    p.add_argument("--request-id", default="", help="client-chosen request id")
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    p.add_argument("--auth-token", default=None, help="bearer token for the router")
    p.add_argument("--tls-ca", default=None, help="PEM CA bundle: connect with TLS")


def build_request(args) -> router_pb2.RouterGenerateRequest:
    """The RouterGenerateRequest the flags describe. Raises ValueError for inconsistent flags."""
    req = router_pb2.RouterGenerateRequest(request_id=args.request_id, model=args.model, stop=args.stop)
    if args.chat:
        messages = [common_pb2.ChatMessage(role=role, content=text)
                    for role, text in getattr(args, "messages_list", None) or []]
        if args.messages:
            try:
                items = json.loads(args.messages)
                messages.extend(common_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in items)
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"--messages: expected a JSON list of {{role, content}} objects ({exc})") from None
        if args.prompt:
            messages.append(common_pb2.ChatMessage(role="user", content=args.prompt))
        if not messages:
            raise ValueError("--chat needs messages: --user TEXT (and --system/--assistant), --messages JSON or --prompt")
        req.chat.messages.extend(messages)
    elif getattr(args, "messages_list", None) or args.messages:
        raise ValueError("--system/--user/--assistant/--messages need --chat")
    elif args.token_ids:
        try:
            req.token_ids.ids.extend(int(t) for t in args.token_ids.split(","))
        except ValueError:
            raise ValueError(f"--token-ids {args.token_ids!r}: expected comma-separated integers") from None
    elif args.prompt is not None:
        req.text = args.prompt
    else:
        raise ValueError("give --prompt TEXT, --token-ids IDS or --chat with messages")
    s = req.sampling
    for flag, field in (("max_tokens", "max_tokens"), ("temperature", "temperature"), ("top_p", "top_p"),
                        ("top_k", "top_k"), ("seed", "seed")):
        value = getattr(args, flag)
        if value is not None:
            setattr(s, field, value)
    if args.ignore_eos:
        s.ignore_eos = True
    if args.include_stop:
        req.include_stop_string = True
    if args.logprobs is not None:
        s.logprobs = True
        s.top_logprobs = args.logprobs
    if args.json or args.logprobs is not None:
        req.return_tokens = True
    return req


def response_record(resp: router_pb2.RouterGenerateResponse) -> dict:
    """One JSON-ready record per response: only what is set."""
    rec: dict = {"request_id": resp.request_id, "text": resp.text}
    if resp.engine_id:
        rec["engine_id"] = resp.engine_id
    if resp.tokens:
        rec["tokens"] = []
        for t in resp.tokens:
            tok = {"id": t.id, "index": t.index}
            if t.HasField("logprob"):
                tok["logprob"] = t.logprob
            if t.top_logprobs:
                tok["top_logprobs"] = [{"id": c.token_id, "logprob": c.logprob} for c in t.top_logprobs]
            rec["tokens"].append(tok)
    if resp.finish_reason:
        rec["finish_reason"] = common_pb2.FinishReason.Name(resp.finish_reason).removeprefix("FINISH_REASON_")
        if resp.HasField("matched_stop_string"):
            rec["matched_stop_string"] = resp.matched_stop_string
        if resp.HasField("matched_stop_token_id"):
            rec["matched_stop_token_id"] = resp.matched_stop_token_id
        rec["usage"] = {"prompt_tokens": resp.usage.prompt_tokens,
                        "completion_tokens": resp.usage.completion_tokens}
    if resp.HasField("error"):
        rec["error"] = {"code": _code_name(resp.error.code),
                        "message": resp.error.message,
                        "reason": common_pb2.ErrorReason.Name(resp.error.reason).removeprefix("ERROR_REASON_")}
    return rec


def _code_name(number: int) -> str:
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code.name
    return str(number)


def _channel(args) -> grpc.Channel:
    if args.tls_ca:
        with open(args.tls_ca, "rb") as f:
            return grpc.secure_channel(args.router, grpc.ssl_channel_credentials(root_certificates=f.read()))
    return grpc.insecure_channel(args.router)


def run(args, out=None, err=None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        req = build_request(args)
    except ValueError as exc:
        print(f"kvmesh generate: {exc}", file=err)
        return 2
    metadata = [("authorization", f"Bearer {args.auth_token}")] if args.auth_token else None
    with _channel(args) as channel:
        call = router_pb2_grpc.RouterStub(channel).Generate(req, timeout=args.timeout, metadata=metadata)
        try:
            return _print_stream(call, args.json, out, err)
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=err)
            return exc.code().value[0]
        except KeyboardInterrupt:
            call.cancel()
            print("cancelled", file=err)
            return EXIT_INTERRUPTED
        except BrokenPipeError:  # `kvmesh generate ... | head`: the reader left; stop quietly
            call.cancel()
            _silence(out)
            return EXIT_BROKEN_PIPE


def _silence(out) -> None:
    """Point a closed stdout at /dev/null, so that the interpreter's final flush raises nothing."""
    try:
        fd = out.fileno()
    except (AttributeError, OSError, ValueError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def _print_stream(call, as_json: bool, out, err) -> int:
    last = None
    for resp in call:
        last = resp
        if as_json:
            print(json.dumps(response_record(resp)), file=out, flush=True)
        elif resp.text:
            out.write(resp.text)
            out.flush()
    if not as_json:
        out.write("\n")
        out.flush()
    if last is not None and last.HasField("error"):
        print(f"error: {_code_name(last.error.code)}: {last.error.message}", file=err)
        return last.error.code or 1
    return 0

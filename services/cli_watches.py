"""``mosaic watch create|list|delete|tail``: standing questions on a running server (docs/watches.md).

gRPC and the client are imported when a command runs (``--help`` stays instant). A failed call prints one
sentence and exits 1; a bad argument exits 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from mosaic_core.cli import count, positive_float
from mosaic_core.terminal import escape_for_terminal, format_span, iso_time
from services.cli_streams import add_client_flags, client_command, open_client

SECRET_ENV = "MOSAIC_WEBHOOK_SECRET"


def webhook_secret(args) -> str:
    """``--webhook-secret``, else ``$MOSAIC_WEBHOOK_SECRET`` (the environment keeps it out of the process list)."""
    return args.webhook_secret if args.webhook_secret is not None else os.environ.get(SECRET_ENV, "")


def add_watch_command(subparsers) -> None:
    watch = subparsers.add_parser("watch", help="standing questions: watch create|list|delete|tail")
    add_client_flags(watch)
    watch.set_defaults(func=run_watch_list)
    sub = watch.add_subparsers(dest="watch_command", metavar="ACTION")

    create = sub.add_parser("create", help="fire an event whenever a newly sealed cluster matches a question")
    create.add_argument("--question", required=True, help="what to look for, as a question")
    create.add_argument("--stream", dest="streams", action="append", default=[], metavar="ID",
                        help="a stream to watch (repeatable; none: every stream, also future ones)")  # fmt: skip
    create.add_argument("--id", dest="watch_id", default="", help="the watch's id (default: the server picks one)")
    create.add_argument("--threshold", type=float, default=None, help="lift in nats to fire (default: server's)")
    create.add_argument(
        "--cooldown-s", type=float, default=None, help="quiet seconds after an event (default: server's)"
    )
    create.add_argument("--hours", default=None, metavar="HH:MM-HH:MM", help="only fire in this local time window")
    create.add_argument("--timezone", default="", help="IANA time zone of --hours (default UTC)")
    create.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="a label (repeatable)")
    create.add_argument("--webhook", default=None, metavar="URL", help="also POST events here (server must allow it)")
    create.add_argument(
        "--webhook-secret",
        default=None,
        help=f"HMAC-SHA256 key that signs each webhook POST (default: ${SECRET_ENV}, which keeps it out of `ps`)",
    )
    create.add_argument("--max-answer-tokens", type=count, default=0, help="tokens of each event's answer (0: 16)")
    add_client_flags(create, suppress=True)
    create.set_defaults(func=run_watch_create)

    listing = sub.add_parser("list", help="every watch with its event count")
    add_client_flags(listing, suppress=True)
    listing.set_defaults(func=run_watch_list)

    delete = sub.add_parser("delete", help="delete a watch and its buffered events")
    delete.add_argument("watch_id", metavar="ID")
    add_client_flags(delete, suppress=True)
    delete.set_defaults(func=run_watch_delete)

    tail = sub.add_parser("tail", help="print events as they fire (Ctrl-C stops; --after resumes)")
    tail.add_argument("watch_ids", nargs="*", metavar="ID", help="watches to follow (none: every watch)")
    after = "start after this event id (0: everything still buffered; default: new events only)"
    tail.add_argument("--after", type=int, default=None, metavar="EVENT_ID", help=after)
    tail.add_argument("--count", type=count, default=0, help="stop after this many events (0: never)")
    tail.add_argument("--timeout-s", type=positive_float, default=None, help="stop after this many seconds")
    add_client_flags(tail, suppress=True)
    tail.set_defaults(func=run_watch_tail)


def _labels(items: list[str]) -> dict[str, str]:
    labels = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"--label {item!r} is not KEY=VALUE")
        labels[key] = value
    return labels


def _hours(text: str | None, timezone: str) -> tuple[str, str, str] | None:
    if text is None:
        return None
    start, sep, end = text.partition("-")
    if not sep:
        raise argparse.ArgumentTypeError(f"--hours {text!r} is not HH:MM-HH:MM")
    return start, end, timezone


@client_command
def run_watch_create(args) -> int:
    try:
        labels, hours = _labels(args.label), _hours(args.hours, args.timezone)
    except argparse.ArgumentTypeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with open_client(args) as client:
        watch = client.create_watch(
            args.question,
            args.streams,
            watch_id=args.watch_id,
            threshold=args.threshold,
            cooldown_s=args.cooldown_s,
            active_hours=hours,
            labels=labels,
            webhook_url=args.webhook,
            webhook_secret=webhook_secret(args),
            max_answer_tokens=args.max_answer_tokens,
        )
    print(f"created watch {watch.watch_id} on {', '.join(watch.stream_ids) or 'every stream'}: threshold "
          f"{watch.threshold:g}, cooldown {watch.cooldown_s:g}s")  # fmt: skip
    return 0


@client_command
def run_watch_list(args) -> int:
    with open_client(args) as client:
        watches = client.list_watches()
    if not watches:
        print("(no watches; create one with `mosaic watch create --question Q [--stream ID]`)")
        return 0
    print(
        "{:<18} {:<16} {:>9} {:>9} {:>6}  {}".format("watch", "streams", "threshold", "cooldown", "events", "question")
    )
    for w in watches:
        streams = ",".join(w.stream_ids) or "*"
        print(f"{w.watch_id:<18} {streams[:16]:<16} {w.threshold:>9g} {w.cooldown_s:>8g}s {w.num_events:>6}  "
              f"{escape_for_terminal(w.question)[:60]}")  # fmt: skip
    return 0


@client_command
def run_watch_delete(args) -> int:
    with open_client(args) as client:
        client.delete_watch(args.watch_id)
    print(f"deleted watch {args.watch_id}")
    return 0


@client_command
def run_watch_tail(args) -> int:
    import grpc

    with open_client(args) as client:
        call = client.watch_events(args.watch_ids, after_event_id=args.after, timeout_s=args.timeout_s)
        seen, last_id = 0, args.after
        try:
            for event in call:
                print_watch_event(event)
                seen, last_id = seen + 1, event.event_id
                if args.count and seen >= args.count:
                    return 0
        except KeyboardInterrupt:
            return 0
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
            return 0
        finally:
            call.cancel()
    resume = "" if last_id is None else f"; --after {last_id} resumes after the last one shown"
    print(f"error: the server ended the event stream after {seen} event(s): a watch it followed was deleted, or the "
          f"server is stopping{resume}", file=sys.stderr)  # fmt: skip
    return 1


def print_watch_event(event) -> None:
    """One line per event (its id first, for ``--after``), then the answer, escaped."""
    latency = event.fired_unix_s - event.sealed_unix_s
    gap = "  (events were dropped before this one)" if event.missed_before else ""
    span = format_span(event.start_s, event.end_s)
    print(f"#{event.event_id} {iso_time(event.fired_unix_s or time.time())} {event.watch_id} {event.stream_id} "
          f"{span} score {event.score:.3f} ({latency:.2f}s after seal){gap}")  # fmt: skip
    text = event.answer if event.answer else f"(no answer: {event.answer_error})"
    print(f"    {escape_for_terminal(text)}", flush=True)

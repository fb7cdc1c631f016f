"""What ``mosaic ask-video`` prints of a question: the answer as its tokens stream, the evidence it drew on, and the
engine's figures for the stream ``video``."""

from __future__ import annotations

from mosaic_core.terminal import escape_for_terminal, format_span


def stream_answer(engine, args):
    """Asks ``args.question`` of the stream ``video``, printing the answer's tokens as they come; returns the final
    ``Answer``."""
    from mosaic_core.engine.results import Answer

    print(f"question: {escape_for_terminal(args.question)}")
    print("answer:   ", end="", flush=True)
    answer = None
    for event in engine.ask("video", args.question, max_new_tokens=args.max_new_tokens):
        if isinstance(event, Answer):
            answer = event
        else:
            print(escape_for_terminal(event.text), end="", flush=True)
    print()
    return answer


def print_evidence(answer) -> None:
    print("evidence (ranked time spans the answer drew on):")
    for span in answer.evidence:
        print(f"  #{span.rank}  {format_span(span.start_s, span.end_s):>15}  score {span.score:.3f}  {span.cluster_id}")
    if not answer.evidence:
        print("  (none: the stream is still shorter than the local window)")


def print_stats(engine, answer, num_frames: int, encode_s: float) -> None:
    stream = engine.stream_stats("video")
    stats = engine.stats()
    r, t = answer.retrieval, answer.timings
    rows = [
        ("mode", stats.mode),
        ("frames", f"{num_frames} ({stream.tokens_per_frame} tokens each)"),
        ("tokens", f"{num_frames * (stream.tokens_per_frame or 0)} visual + {stream.sink_tokens} sink"),
        ("clusters", f"{stream.num_clusters} " + _tiers(stream.clusters_by_tier)),
        ("bytes per tier", _tiers(stream.bytes_by_tier)),
        ("encode", f"{encode_s:.2f} s ({num_frames / max(encode_s, 1e-9):.1f} frames/s)"),
        ("retrieved", f"{r.num_clusters_retrieved} clusters, {r.num_tokens_retrieved} tokens per layer"),
        ("moved to device", f"{r.bytes_fetched:,} bytes in {r.num_copies} copies"),
        ("time to first token", f"{t.time_to_first_token_s * 1e3:.1f} ms"),
        ("decode", f"{t.decode_s_per_token * 1e3:.1f} ms/token over {t.num_tokens} tokens"),
    ]
    print("stats:")
    for name, value in rows:
        print(f"  {name:<20} {value}")


def _tiers(values: dict) -> str:
    return "(" + ", ".join(f"{k} {v:,}" for k, v in values.items()) + ")"

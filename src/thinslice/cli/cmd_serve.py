"""``thinslice serve``: the DICOM node. Receives thick series (C-STORE), sends thin series back (C-STORE/folder).

``--status`` lists the spool's jobs; ``--complete`` marks series complete now instead of waiting for them to be
stable. Both read and write the spool's job queue, so they work beside a running node.
"""

from __future__ import annotations

import argparse
import time


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run a DICOM node: receive thick series (C-STORE), send thin series back into their study",
        description="Listen as a DICOM node (C-ECHO, C-STORE SCP) for the callers the rule file allows; each "
                    "series, once no instance arrived for [node] stable_seconds, is matched against the rules, "
                    "upsampled and sent to the rule's destinations (C-STORE and/or a folder). Jobs live in "
                    "SPOOL/jobs.sqlite: a restarted node resumes them and sends nothing twice. Needs pynetdicom "
                    "(pip install 'thinslice[node]').",
    )
    parser.add_argument("--spool", required=True, metavar="DIR", help="spool folder (instances, results, job queue)")
    parser.add_argument("--rules", metavar="RULES.toml", default=None,
                        help="rule file: [node] limits and allowed callers, [destinations.NAME], [[rule]] (required "
                             "to serve)")
    parser.add_argument("--ae-title", default="THINSLICE", help="the node's AE title (default THINSLICE)")
    parser.add_argument("--port", type=int, default=11112, help="DICOM port to listen on (default 11112)")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0: all)")
    parser.add_argument("--log-phi", action="store_true",
                        help="allow patient IDs in debug logs (by default logs never name the patient)")
    parser.add_argument("--status", action="store_true", help="list the spool's jobs, states and timings, and exit")
    parser.add_argument("--complete", metavar="SERIES_UID", default=None,
                        help="mark a series complete now instead of waiting until it is stable ('all': every "
                             "series still receiving), or try a failed series afresh; and exit")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from thinslice.errors import ThinsliceError

    if args.status:
        print(status_text(args.spool))
        return 0
    if args.complete is not None:
        return _complete(args.spool, args.complete)
    if args.rules is None:
        raise ThinsliceError("thinslice serve needs --rules RULES.toml (or --status / --complete)")
    if not 0 < args.port < 65536:
        raise ThinsliceError(f"--port must be 1-65535, not {args.port}")
    try:
        import pynetdicom  # noqa: F401
    except ImportError:
        raise ThinsliceError("thinslice serve needs pynetdicom: pip install 'thinslice[node]'") from None
    from thinslice.node.rules import load_rules
    from thinslice.node.service import Node

    rules = load_rules(args.rules)
    node = Node(args.spool, rules, ae_title=args.ae_title, port=args.port, host=args.host, log_phi=args.log_phi)
    node.serve_forever()
    return 0


def _complete(spool: str, which: str) -> int:
    from thinslice.node.queue import JobQueue

    queue = JobQueue(spool)
    try:
        count = queue.complete(None if which == "all" else which)
    finally:
        queue.close()
    print(f"{count} series marked complete")
    return 0


def status_text(spool: str) -> str:
    """One line per job: series, state, instances, attempts, times (received, processing, total) and reason."""
    from thinslice.node.queue import JobQueue

    queue = JobQueue(spool)
    try:
        jobs, sent = queue.jobs(), queue.sent_rows()
    finally:
        queue.close()
    lines = [f"{'series':<40} {'state':<9} {'inst':>5} {'tries':>5} {'received':<19} {'process_s':>9} "
             f"{'total_s':>8}  reason"]
    for job in jobs:
        received = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(job.last_received))
        process = f"{job.processed - job.started:.1f}" if job.processed and job.started else ""
        total = f"{job.finished - job.last_received:.1f}" if job.finished and job.state == "sent" else ""
        lines.append(f"{job.series_uid[-40:]:<40} {job.state:<9} {job.instances:>5} {job.attempts:>5} "
                     f"{received:<19} {process:>9} {total:>8}  {job.reason}")
    counts: dict[str, int] = {}
    for job in jobs:
        counts[job.state] = counts.get(job.state, 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no jobs"
    lines.append(f"{summary}; {len(sent)} delivery(ies) recorded")
    return "\n".join(lines)

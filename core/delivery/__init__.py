"""The deliver stage: each distinct result to the next hop once, and the gate's own reports.

Next hops: SMTP (a small streaming client of its own), a sendmail-compatible command run
from an argv list, or stdout.  Every hop answers with a reply per recipient, and each
recipient gets a result (``outcome.Result``) the run's exit status follows from.  Reports
(postmaster, notices from filters, bounces for partly refused mail) go out through the
same hop, with the null sender.

The package, in the order a delivery runs: a run hands :mod:`.groups` a Job (not itself,
:mod:`.handover`); groups merges identical results and hands each group over, through the
hand-over (the commit point), to a next hop of :mod:`.hops` (SMTP in :mod:`.smtp`);
:mod:`.reports` writes the gate's own messages; :mod:`.wire` is what every hop shares.
"""

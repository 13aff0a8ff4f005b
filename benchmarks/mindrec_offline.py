"""MindRec against plain SFT (AR beam search) offline on Amazon Industrial, at equal beams.

Usage: ``python benchmarks/mindrec_offline.py [--out DIR] [--test-rows N] [--quick]``; prints the
table and writes ``mindrec.json`` / ``mindrec.md`` (``agorasim.run.mindrec_offline.run``).
"""

from __future__ import annotations

import argparse

from agorasim.run.mindrec_offline import run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/mindrec_offline")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-rows", type=int, default=1000)
    p.add_argument("--valid-rows", type=int, default=300)
    p.add_argument("--beams", type=int, default=10)
    p.add_argument("--sft-epochs", type=int, default=16)
    p.add_argument("--mindrec-epochs", type=int, default=16)
    p.add_argument("--eval-every", type=int, default=4, help="MindRec epochs between validation decodings")
    p.add_argument("--history-attention", choices=("full", "prefix"), default="full",
                   help="MindRec's attention: full (the paper's) or prefix (the history's keys and values cached)")
    p.add_argument("--no-ar", action="store_true", help="skip the SFT (AR) model; compare MindRec's decodings")
    p.add_argument("--quick", action="store_true", help="a tiny run to check the set-up")
    args = p.parse_args()
    if args.quick:
        run(args.out, args.seed, train_users=200, valid_rows=50, test_rows=50, beams=args.beams, sft_epochs=2,
            mindrec_epochs=2, eval_every=1, hidden=32, history_attention=args.history_attention)
    else:
        run(args.out, args.seed, valid_rows=args.valid_rows, test_rows=args.test_rows, beams=args.beams,
            sft_epochs=args.sft_epochs, mindrec_epochs=args.mindrec_epochs, ar=not args.no_ar,
            eval_every=args.eval_every, history_attention=args.history_attention)


if __name__ == "__main__":
    main()

"""`lifelong generate`: sample text from any stored version."""

from __future__ import annotations

import argparse

from ..checkpoint import checkout_model
from ..model import sample_text
from .common import add_parser, open_store, print_json


def cmd_generate(args: argparse.Namespace) -> int:
    store = open_store(args, read_only=True)
    model, origin = checkout_model(store, args.version, device=args.device)
    text = sample_text(model, args.prompt, args.tokens, temperature=args.temperature, top_k=args.top_k or None, seed=args.seed)
    if args.json:
        print_json({"version": origin.version.id, "prompt": args.prompt, "text": text})
    else:
        print(text)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = add_parser(sub, "generate", "sample text from a version (byte-level, temperature and top-k)",
                   "lifelong --store ./store generate HEAD --prompt 'def ' --tokens 200")
    p.add_argument("version", nargs="?", default="HEAD", help="id, tag, ref or HEAD~n")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--tokens", type=int, default=200, help="bytes to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=20, help="sample among the k most likely (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_generate)

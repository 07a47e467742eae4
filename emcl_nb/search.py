"""Text search over your own videos with a trained model: `python -m emcl_nb.search`

    python -m emcl_nb.search index --checkpoint synthetic/default --videos DIR --index OUT
    python -m emcl_nb.search query --index OUT "a man is cooking" -k 10 [--json]

`index` encodes every video file under DIR once (the test split's sampling and transform),
resumably, and lists the files it could not read; running it again encodes only new and
changed files and drops deleted ones. `query` ranks the indexed videos with the model's own
scoring (text-conditioned pooling and the EMCL block, as at evaluation) and prints rank,
score, the time of the frame the query attends to most, and the path
(emcl_nb.retrieval.index).
--checkpoint takes a checkpoint file (ours or the reference code's), a run folder or a run
name (<dataset>/<run> under outputs/); a reference checkpoint is built from --params and --set.
"""
from __future__ import annotations

import argparse
import json
import time

from emcl_nb.cli import add_traceback_flag, run_command
from emcl_nb.retrieval.index import build_index, format_hits, load_index_model, read_index, search, stale_paths
from emcl_nb.retrieval.trained import load


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    index = commands.add_parser("index", help="encode a folder of videos into an index")
    index.add_argument("--checkpoint", required=True, help="a checkpoint file, a run folder or <dataset>/<run>")
    index.add_argument("--videos", required=True, help="the folder of videos (searched recursively)")
    index.add_argument("--index", required=True, help="the index folder to write (or update)")
    index.add_argument("--params", default=None,
                       help="parameters of a reference-code checkpoint: a params/<name>.yaml name or a "
                            "YAML path (default: emcl_nb/params.py's defaults; ours carry their own)")
    index.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                       help="override parameters, e.g. num_workers=8 batch_size_val=64")
    index.add_argument("--rebuild", action="store_true", help="encode everything again, whatever is there")
    index.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: CUDA when present)")
    query = commands.add_parser("query", help="rank the indexed videos for text queries")
    query.add_argument("--index", required=True, help="an index folder written by `index`")
    query.add_argument("text", nargs="+", help="one or more queries (quote each)")
    query.add_argument("-k", type=int, default=10, help="results per query (default 10)")
    query.add_argument("--json", action="store_true", help="print JSON (one object per query, in a list)")
    query.add_argument("--device", default=None, help="cpu, cuda, ... (default: CUDA when present)")
    add_traceback_flag(parser)
    args = parser.parse_args(argv)
    run_command(lambda: search_command(args), traceback=args.traceback)


def search_command(args) -> None:
    if args.command == "index":
        model = load(args.checkpoint, args.device, params=args.params, overrides=" ".join(args.set))
        print(build_index(model, args.videos, args.index, rebuild=args.rebuild).summary())
        return
    found = read_index(args.index)
    model = load_index_model(found, args.device)
    answers = []
    for text in args.text:
        start = time.perf_counter()
        hits = search(model, found, [text], args.k)[0]
        answers.append({"query": text, "seconds": time.perf_counter() - start, "videos": len(found),
                        "results": [hit.to_dict() for hit in hits], "stale": stale_paths(found, hits)})
        if not args.json:
            print(format_hits(text, hits, len(found), answers[-1]["seconds"]))
            for path in answers[-1]["stale"]:
                print(f"  note: {path} was deleted or changed since it was indexed; run `index` again")
    if args.json:
        print(json.dumps(answers, indent=1))


if __name__ == "__main__":
    main()

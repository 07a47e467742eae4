"""`make demo`: notebooks 01 -> 06 run headlessly with papermill on one dataset.

    python -m emcl_nb.demo [--dataset synthetic] [--run default] [--set key=value ...]
    python -m emcl_nb.demo --refresh      # `make notebooks`: also store the executed
                                          # notebooks in notebooks/, train the seed study
                                          # and rewrite the README's results section

Progress bars are off unless `--set progress=true`: in a headless kernel every bar update
is a message the CPU cores pay for. The work is in emcl_nb.analysis.demo.
"""
from __future__ import annotations

import argparse
import shlex
import time

from emcl_nb.analysis.demo import headline, refresh, run_notebooks
from emcl_nb.params import repo_relative


def demo_overrides(settings: list[str]) -> str:
    """The notebooks' `overrides` string: `--set` items, quoted as a shell would, after
    progress=false unless they set progress themselves (a key given twice is an error)."""
    given = {item.partition("=")[0] for item in settings}
    defaults = [] if "progress" in given else ["progress=false"]
    return " ".join(defaults + [shlex.quote(item) for item in settings])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="synthetic")
    parser.add_argument("--run", default="default")
    parser.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE")
    parser.add_argument("--refresh", action="store_true",
                        help="store the executed notebooks in notebooks/, run the seed study and "
                             "rewrite the README's results section")
    args = parser.parse_args(argv)
    overrides = demo_overrides(args.set)
    start = time.perf_counter()
    out_dir = run_notebooks(args.dataset, args.run, overrides)
    run_dir = out_dir.parent
    print(f"\n[emcl_nb] demo finished in {time.perf_counter() - start:.0f} s")
    print(f"  executed notebooks: {repo_relative(out_dir)}")
    print(f"  metrics:            {repo_relative(run_dir / 'metrics.md')}")
    print(f"  ablations:          {repo_relative(run_dir / 'ablations.md')}")
    print(f"  figures:            {repo_relative(run_dir / 'figures')}")
    print(f"  {headline(args.dataset, args.run, overrides)}")
    if args.refresh:
        refresh(args.dataset, args.run, overrides, out_dir)


if __name__ == "__main__":
    main()

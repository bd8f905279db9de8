"""`python -m ift_dist.eval` / `deepspeed --module ift_dist.eval`: see ift_dist/eval/cli.py."""

from ift_dist import dist
from ift_dist.eval.cli import main

if __name__ == "__main__":
    dist.exit_process(main())

"""``python -m agent.tools.watch``: the same as ``lorry-agent watch``."""

import argparse
import sys

import agent.tools.watch as package
from agent.tools.watch.cli import add_arguments, main

parser = argparse.ArgumentParser(prog="lorry-agent watch", description=(package.__doc__ or "").split("\n\n")[0])
add_arguments(parser)
sys.exit(main(parser.parse_args()))

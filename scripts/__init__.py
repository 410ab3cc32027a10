"""Command-line tools on top of the chattune packages: the `chattune` command (scripts/cli.py), data tools,
benchmarks and demos, each also run as `python scripts/NAME.py`.

Installed (pyproject) so that `chattune`, the scripts and the tests import them as `scripts.NAME` from anywhere,
with no sys.path patching. Direction of imports: scripts may import data, train, serve and eval; those packages
never import scripts.
"""

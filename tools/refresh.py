"""Refresh a served cache from recent traffic: `python tools/refresh.py --help`.

The command is :mod:`layercache.cli.refresh` (also installed as a console script); this file runs it from a checkout.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without `pip install`

from layercache.cli.refresh import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

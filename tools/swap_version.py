"""Swap the version TorchServe serves by default, or roll back: `python tools/swap_version.py --help`.

The command is :mod:`layercache.cli.swap` (also installed as a console script); this file runs it from a checkout.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without `pip install`

from layercache.cli.swap import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

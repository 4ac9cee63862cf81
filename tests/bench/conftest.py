"""The benchmark scripts import as `bench.<name>` from the repository root (bench/ is no installed
package): put the root on sys.path however pytest was started."""

import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

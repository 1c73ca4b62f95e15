"""One measurement in a fresh Python process: its own heap, thread pools and page cache state, so engines measured
one after another in a round do not inherit each other's warm-up."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any


def call_fresh(module: str, function: str, *args: Any) -> Any:
    """``module.function(*args)`` run in a new interpreter; its result must be JSON and is returned parsed (the
    last line the child prints, so the measured code may log before it)."""
    code = (f"import json; from {module} import {function}; "
            f"print(json.dumps({function}(*json.loads({json.dumps(json.dumps(list(args)))}))))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])

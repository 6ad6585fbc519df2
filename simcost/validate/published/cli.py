"""``simcost validate published``: evaluate the CSV's rows, print the report, write
``published.json`` and ``published.md``."""
from __future__ import annotations

import json
import math
import sys

from simcost.errors import SimcostError
from simcost.validate.published.outdir import NOT_WRITTEN, make_out_dir, resolve_out_dir
from simcost.validate.published.predict import evaluate
from simcost.validate.published.report import print_report, to_json, to_markdown
from simcost.validate.published.rows import load_rows, source_of


def run_cli(args) -> int:
    """Entry point for ``simcost validate published`` (args: out_dir, source, optional csv;
    ``out_dir`` None: the checkout's validation/reports, or nothing in an installed package)."""
    out = resolve_out_dir(getattr(args, "out_dir", None))
    rows = load_rows(getattr(args, "csv", None))
    source = getattr(args, "source", None)
    results = evaluate(rows, source)
    if source and not results:
        raise SimcostError(f"no rows from source '{source}'; sources: "
                           f"{', '.join(sorted({source_of(r['id']) for r in rows}))}")
    print_report(results)
    if out is None:
        print(f"simcost: warning: {NOT_WRITTEN}", file=sys.stderr)
        return 0
    make_out_dir(out)
    try:
        (out / "published.json").write_text(json.dumps(to_json(results), indent=1,
                                                       default=_json_default))
        (out / "published.md").write_text(to_markdown(results))
    except OSError as e:
        raise SimcostError(f"--out-dir '{out}': cannot write the report "
                           f"({e.strerror or e})") from None
    return 0


def _json_default(o):
    if isinstance(o, float) and math.isnan(o):
        return None
    if isinstance(o, tuple):
        return list(o)
    return str(o)

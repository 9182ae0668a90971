"""The README's failure table quotes log lines agentd really prints.

Each backticked line in the table's last column must be an instance of one of
agentd's own message templates (a logging format or an f-string in agentd/),
with ``CA..`` standing for a call sid and ``...`` for any text; a quote ending in ``:``
is the first line of a message whose details follow.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_PERCENT = re.compile(r"%(?:\.\d+)?[sdgfr]")
MIN_LITERAL = 12


def templates() -> list[re.Pattern]:
    """Every string literal and f-string of agentd's source as a regex (placeholders match anything).

    Templates with under MIN_LITERAL characters of their own ("%s: %s") would match any line; left out.
    """
    out = []
    for path in (ROOT / "agentd").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                literals = _PERCENT.split(node.value)
            elif isinstance(node, ast.JoinedStr):
                literals = [v.value if isinstance(v, ast.Constant) else None for v in node.values]
                literals = "".join("\0" if part is None else part for part in literals).split("\0")
            else:
                continue
            if sum(map(len, literals)) >= MIN_LITERAL:
                out.append(".+".join(re.escape(part) for part in literals))
    return [re.compile(pattern, re.DOTALL) for pattern in out]


def quoted_log_lines() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    table = text[text.index("## Failure behaviour"):].split("\n## ")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| fault")]
    return [m for row in rows for m in re.findall(r"`([^`]+)`", row.rsplit(" | ", 1)[1])
            if not m.startswith("server.") and " " in m]


def test_every_quoted_log_line_is_one_agentd_prints():
    patterns = templates()
    lines = quoted_log_lines()
    assert len(lines) >= 12
    for line in lines:
        concrete = line.replace("CA..", "CA0123").replace("...", "x")
        if line.endswith(":"):  # the first line of a message whose details follow on the next lines
            concrete += "\nx"
        assert any(p.fullmatch(concrete) for p in patterns), f"README quotes a line agentd never prints: {line}"

"""Count a package's lines of code, docstrings and comments, and its device branches.

``python benchmarks/count_code.py [sksae]`` prints one table: per module, the
lines of code, of docstrings and of comments, and whether the module branches
on the device type (reads ``.device.type``, calls ``is_accelerator`` or names
``torch.cuda``). Used for the before/after counts of the redesign (issue 16).
"""

import ast
import io
import re
import sys
import tokenize
from pathlib import Path

_DEVICE_BRANCH = re.compile(r"device\.type|is_accelerator\(|torch\.cuda|\.is_cuda\b")


def count(path):
    text = path.read_text()
    doc_lines = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                doc_lines.update(range(body[0].lineno, body[0].end_lineno + 1))
    comment_lines, code_lines, code = set(), set(), []
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            comment_lines.add(tok.start[0])
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                              tokenize.ENDMARKER, tokenize.ENCODING):
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
            if tok.start[0] not in doc_lines:
                code.append(tok.string)
    code_lines -= doc_lines
    branches = len(_DEVICE_BRANCH.findall("".join(code)))  # in code, not in prose
    return len(code_lines), len(doc_lines), len(comment_lines - code_lines), branches


def main(root="sksae"):
    rows = [(str(p), *count(p)) for p in sorted(Path(root).rglob("*.py"))
            if "__pycache__" not in p.parts]
    print(f"{'module':48s} {'code':>6s} {'docs':>6s} {'comments':>8s} {'device branches':>15s}")
    for row in rows:
        print(f"{row[0]:48s} {row[1]:6d} {row[2]:6d} {row[3]:8d} {row[4]:15d}")
    totals = [sum(r[i] for r in rows) for i in range(1, 5)]
    branching = [r[0] for r in rows if r[4]]
    print(f"{'total (' + str(len(rows)) + ' modules)':48s} {totals[0]:6d} {totals[1]:6d} "
          f"{totals[2]:8d} {totals[3]:15d}")
    print(f"modules that branch on the device type: {len(branching)}")
    for name in branching:
        print(f"  {name}")


if __name__ == "__main__":
    main(*sys.argv[1:])

"""Write the student version of this repository: every function marked `# Exercise N: ...` keeps
its signature and docstring, and its body becomes `raise NotImplementedError("Exercise N: ...")`.
Nothing else differs, but for the experiments' measured answers (course/experiments.json and the
plots beside it), which the copy leaves out: a student's own run of course/experiments.py writes
them, and would otherwise be merged into ours. A note at the top of the copy's course/README.md
says so, as that page links to the plots.

    python course/make_student_copy.py ../twostage-student   # then, in the copy:
    python -m pytest -q course/test_exercises.py               # 9 failures, one per exercise

The copy takes the files git tracks (so no runs/, data/ or .venv/); outside a git checkout, every
file except those folders. The exercises and what grades them: course/README.md.
"""
import argparse
import ast
import os
import re
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARK = re.compile(r"^\s*# Exercise (\d+): (.+?)\s*$")
SKIP = {".git", ".venv", "runs", "data", "__pycache__", ".pytest_cache"}
STUDENT_NOTE = """> **This is the student copy.** The nine exercises' bodies are blank, and the experiments'
> measured answers (`experiments.json` and the plots `gamma.png`, `kappa.png` and `budget.png` that
> this page links to) are left out: once the nine graders pass, `python course/experiments.py`
> writes your own, and the links below open them. The numbers quoted on this page are ours.

"""


def is_answer(rel):
    """course/experiments.py's output, committed as the answers we measured: not in the copy."""
    return rel == "course/experiments.json" or (rel.startswith("course/") and rel.endswith(".png"))


def blank_exercises(source):
    """source with each marked function's body (after its docstring) replaced by a raise.
    Returns (new source, [(number, title)])."""
    lines = source.splitlines(keepends=True)
    marks = {}  # line number (1-based) of the mark -> (number, title)
    for i, line in enumerate(lines, 1):
        m = MARK.match(line)
        if m:
            marks[i] = (int(m.group(1)), m.group(2))
    found, edits = [], []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        first = min([node.lineno] + [d.lineno for d in node.decorator_list])
        if first - 1 not in marks:
            continue
        number, title = marks[first - 1]
        body = node.body
        has_doc = isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str)
        if has_doc and len(body) == 1:
            raise SystemExit(f"make_student_copy.py: error: exercise {number} ({node.name}) has no body after its docstring")
        start = body[1].lineno if has_doc else body[0].lineno  # first line to replace
        indent = re.match(r"\s*", lines[start - 1]).group(0)
        message = f"Exercise {number}: {title}".replace('"', "'")
        edits.append((start, node.end_lineno, f'{indent}raise NotImplementedError("{message}")\n'))
        found.append((number, title))
    for start, end, text in sorted(edits, reverse=True):  # bottom up, so line numbers stay valid
        lines[start - 1:end] = [text]
    if len(found) != len(marks):
        raise SystemExit("make_student_copy.py: error: a '# Exercise N:' line is not directly above a function "
                         f"(marks at lines {sorted(marks)}); fix: put the mark on the line before the def or its decorator")
    return "".join(lines), found


def tracked_files():
    """The repository's files as paths relative to it, with "/" as git writes them (on every system)."""
    try:
        out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
        return [f for f in out.splitlines() if os.path.exists(os.path.join(REPO, f))]
    except (OSError, subprocess.CalledProcessError):
        files = []
        for root, dirs, names in os.walk(REPO):
            dirs[:] = [d for d in dirs if d not in SKIP]
            files += [os.path.relpath(os.path.join(root, n), REPO).replace(os.sep, "/") for n in names]
        return files


def main(argv=None):
    p = argparse.ArgumentParser(description="Write the student copy of the repository (course/README.md).")
    p.add_argument("dest", help="a directory that does not exist yet")
    args = p.parse_args(argv)
    dest = os.path.abspath(args.dest)
    if os.path.exists(dest):
        raise SystemExit(f"make_student_copy.py: error: {dest} exists; fix: pass a new directory (or delete it)")
    tmp = dest + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    exercises = []
    for rel in [f for f in tracked_files() if not is_answer(f)]:
        src, out = os.path.join(REPO, rel), os.path.join(tmp, rel)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        if rel.endswith(".py") and not rel.startswith("course/"):
            text = open(src, encoding="utf-8").read()
            if any(MARK.match(line) for line in text.splitlines()):
                text, found = blank_exercises(text)
                exercises += [(n, t, rel) for n, t in found]
            with open(out, "w", encoding="utf-8") as f:
                f.write(text)
            shutil.copymode(src, out)
        elif rel == "course/README.md":  # its links to the plots the copy leaves out: say why they are missing
            with open(out, "w", encoding="utf-8") as f:
                f.write(STUDENT_NOTE + open(src, encoding="utf-8").read())
        else:
            shutil.copy2(src, out)
    os.replace(tmp, dest)
    for n, title, rel in sorted(exercises):
        print(f"Exercise {n}: {title}  ({rel})")
    print(f"wrote {dest}: {len(exercises)} exercises; grade them with `python -m pytest -q course/test_exercises.py` there")
    return exercises


if __name__ == "__main__":
    main()

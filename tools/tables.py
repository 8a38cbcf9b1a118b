"""The docs' tables of results, generated from their committed JSON, so that no number goes stale:

    python tools/tables.py            # check: every marked table equals its JSON (exit 1 naming each that does not)
    python tools/tables.py --write    # regenerate every marked table in place

A table of results in README.md or docs/*.md sits right under a marker that names its JSON and
its columns:

    <!-- table: benchmarks/results/coverage.json#rows where seeds=5 | scenario = {scenario} | coverage = {coverage:.3f} -->
    | scenario | coverage |
    |---|---|
    | lore K=3 | 0.951 |

- `PATH` is relative to the repository root; `#KEY[.KEY...]` picks the list of records inside it
  (none: the JSON itself is the list); `where k=v[,k=v...]` keeps the records whose str(k) is v;
- `by k[,k...]` makes one row of each group of records with the same values of those keys (a curve
  per row): the row's record holds the keys' values, and every other field as the list of its
  values over the group, in the JSON's order (`{unseen_test[2]:.4f}` is the group's third record's);
- every `HEADER = TEMPLATE` is a column: TEMPLATE is a str.format template over one record
  (`{seen_test_ci[0]:.3f}` indexes a list); a HEADER with braces is a template over the first
  row's record (`{shots[2]}`), so that a header cannot disagree with its column;
- the rows follow the JSON's order.

A results table that is not (yet) generated carries instead `<!-- table: not generated: WHY -->`,
WHY saying where its numbers come from and whether they were re-measured; tests/test_docs.py
requires one of the two markers above every table with measured numbers, and that every generated
table equals its JSON.
"""
import argparse
import glob
import json
import os
import re
import string
import sys

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
MARKER = re.compile(r"^<!-- table: (.*) -->$")


def pages():
    return ["README.md"] + sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))


def parse_marker(spec):
    """'PATH[#KEY] [where k=v,...] [by k,...] | H = T | ...' -> (path, key, {k: v}, [k, ...],
    [(header, template)]); None for a 'not generated: ...' marker."""
    if spec.startswith("not generated:"):
        return None
    source, *columns = [part.strip() for part in spec.split(" | ")]
    where, by = {}, []
    if " by " in source:
        source, keys = source.split(" by ", 1)
        by = keys.split(",")
    if " where " in source:
        source, cond = source.split(" where ", 1)
        where = dict(c.split("=", 1) for c in cond.split(","))
    path, _, key = source.partition("#")
    if not columns or any(" = " not in c for c in columns):
        raise ValueError(f"table marker {spec!r}: its columns must be 'HEADER = TEMPLATE' separated by ' | '")
    return path, key, where, by, [tuple(c.split(" = ", 1)) for c in columns]


def grouped(records, by):
    """One record per group of records equal on the keys `by` (in order of first appearance): the
    keys' values, and every other field as the list of its values over the group."""
    groups = {}
    for r in records:
        groups.setdefault(tuple(str(r.get(k)) for k in by), []).append(r)
    return [{**{k: [r.get(k) for r in group] for k in group[0]}, **{k: group[0].get(k) for k in by}}
            for group in groups.values()]


class Formatter(string.Formatter):
    """str.format, except that a missing value (None in the JSON) renders as '-' under any spec."""

    def format_field(self, value, spec):
        return "-" if value is None else super().format_field(value, spec)


FORMAT = Formatter()


def render(spec):
    """The Markdown table (a list of lines) a generated marker describes."""
    path, key, where, by, columns = parse_marker(spec)
    records = json.load(open(os.path.join(REPO, path)))
    for k in filter(None, key.split(".")):
        records = records[k]
    records = [r for r in records if all(str(r.get(k)) == v for k, v in where.items())]
    if by:
        records = grouped(records, by)
    headers = [FORMAT.format(h, **records[0]) if "{" in h and records else h for h, _ in columns]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(columns)]
    for r in records:
        lines.append("| " + " | ".join(FORMAT.format(t, **r) for _, t in columns) + " |")
    return lines


def tables(text):
    """-> [(marker line index, spec, first table line, end)] of a page's markers; a marker must be
    followed by its table (on the next line)."""
    lines = text.split("\n")
    found = []
    for i, line in enumerate(lines):
        m = MARKER.match(line)
        if m:
            end = i + 1
            while end < len(lines) and lines[end].startswith("|"):
                end += 1
            found.append((i, m.group(1), i + 1, end))
    return found


def check_page(page, write=False):
    """-> the problems of a page's generated tables (rewritten in place with write=True)."""
    text = open(os.path.join(REPO, page)).read()
    lines = text.split("\n")
    problems = []
    for i, spec, start, end in reversed(tables(text)):
        if start == end:
            problems.append(f"{page}:{i + 1}: a table marker with no table under it")
            continue
        if parse_marker(spec) is None:
            continue
        want = render(spec)
        if lines[start:end] != want:
            problems.append(f"{page}:{start + 1}: the table differs from {spec.split(' | ')[0]}")
            lines[start:end] = want
    if write:
        open(os.path.join(REPO, page), "w").write("\n".join(lines))
    return problems


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", action="store_true", help="regenerate the tables in place")
    return p.parse_args(argv)


def main(args):
    problems = [p for page in pages() for p in check_page(page, args.write)]
    for p in problems:
        print(("rewrote " if args.write else "") + p)
    return 1 if problems and not args.write else 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))

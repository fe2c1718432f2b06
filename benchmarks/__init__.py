"""Benchmarks: harness, suites, result tables and plots."""


def write_json(out_dir: str, stem: str, results: dict) -> str:
    """Write `results` to `<out_dir>/<stem>.json`; returns the path."""
    import json
    import os

    path = os.path.join(out_dir, f"{stem}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    return path


def write_report(out_dir: str, stem: str, results: dict, markdown: str) -> str:
    """`write_json` (the folder made where missing), and `markdown` beside it as `<stem>.md`; prints the
    markdown and where both went; returns the JSON's path."""
    import os

    os.makedirs(out_dir, exist_ok=True)
    path = write_json(out_dir, stem, results)
    with open(path.removesuffix(".json") + ".md", "w", encoding="utf-8") as f:
        f.write(markdown + "\n")
    print(markdown)
    print(f"wrote {path} and .md")
    return path

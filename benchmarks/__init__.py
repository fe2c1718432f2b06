"""Benchmarks: harness, suites, result tables and plots."""


def write_json(out_dir: str, stem: str, results: dict) -> str:
    """Write `results` to `<out_dir>/<stem>.json`; returns the path."""
    import json
    import os

    path = os.path.join(out_dir, f"{stem}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    return path

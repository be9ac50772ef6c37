"""A sweep's reports: results.csv (+ a printed table), plot.png, best_config.yaml and the best and
worst finished trials' sample grids (each trial's checkpoint holds `eval_grid.png`)."""

from __future__ import annotations

import io
from typing import Any, Callable

import yaml

from pipelines import storage

GRID_NAME = "eval_grid.png"


def write_reports(title: str, out: str, rows: list[dict], params: list[str], metric: str, plot_x: list[str],
                  best_config: Callable[[dict], dict], header: Callable[[dict, dict], str]) -> dict | None:
    """Write every report under `out`; returns the best finished trial's config (None if none finished).
    best_config(row) -> the YAML body; header(row, body) -> comment lines above it."""
    import pandas as pd

    public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    df = pd.DataFrame(public)
    if "objective" in df:
        df = df.sort_values("objective", ascending=False, na_position="last")
    storage.write_bytes(storage.join(out, "results.csv"), df.to_csv(index=False).encode())
    print_table(df, params, metric, f"{title}: {len(df)} trials")
    write_plot(title, df, plot_x, storage.join(out, "plot.png"))

    done = [r for r in rows if r["status"] == "TERMINATED" and r.get("objective") is not None and r["_checkpoint"]]
    if not done:
        return None
    done.sort(key=lambda r: r["objective"], reverse=True)
    best, worst = done[0], done[-1]
    for tag, row in (("best", best), ("worst", worst)):
        grid = storage.join(row["_checkpoint"], GRID_NAME)
        if storage.exists(grid):
            storage.write_bytes(storage.join(out, f"{tag}_grid.png"), storage.read_bytes(grid))
    body = best_config(best)
    text = (f"# best of {len(done)} finished trials: {best['trial_id']}, objective {best['objective']:.4f} "
            f"({metric}{', artifact ratio %.3f' % best['artifact_ratio'] if 'artifact_ratio' in best else ''})\n"
            + header(best, body) + yaml.safe_dump(body, sort_keys=False))
    storage.write_bytes(storage.join(out, "best_config.yaml"), text.encode())
    return body


def print_table(df, params: list[str], metric: str, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    cols = ["trial_id", "status", *params, "objective", metric, "artifact_ratio", "step", "training_iteration", "error"]
    cols = [c for c in dict.fromkeys(cols) if c in df]
    table = Table(title=title)
    for c in cols:
        table.add_column(c, overflow="fold")
    for _, r in df.iterrows():
        table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in (r[c] for c in cols)])
    Console(width=160).print(table)


def write_plot(title: str, df, xs: list[str], uri: str) -> None:
    """The objective against each searched parameter in `xs` (the first of prompts/step if none is numeric)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [x for x in xs if x in df and numeric(df[x]).notna().any()] or [c for c in ("prompts", "step") if c in df][:1]
    fig, axes = plt.subplots(1, max(1, len(xs)), figsize=(5 * max(1, len(xs)), 4), squeeze=False)
    ok = df[df["status"] != "ERROR"] if "objective" in df else df.iloc[0:0]
    for ax, x in zip(axes[0], xs):
        if "objective" in ok and len(ok):
            groups = ok.groupby("sampler") if "sampler" in ok else [("trials", ok)]
            for name, g in groups:
                ax.scatter(numeric(g[x]), numeric(g["objective"]), label=str(name))
            ax.legend()
        ax.set_xlabel(x)
        ax.set_ylabel("objective")
        ax.set_xscale("log" if x == "cfg_scale" else "linear")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title}: objective")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    storage.write_bytes(uri, buf.getvalue())


def numeric(series) -> Any:
    import pandas as pd

    return pd.to_numeric(series, errors="coerce")

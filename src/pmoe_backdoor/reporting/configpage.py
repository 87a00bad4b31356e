"""The configuration a run used, for the report: the merged config as YAML, and an HTML page with it and with
each config file given (path and content) and any command-line overrides."""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

_CSS = """
body { font: 13px/1.4 -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; color: #222; margin: 12px; }
h1 { font-size: 17px; } h2 { font-size: 14px; margin-top: 22px; }
code.path { background: #f3f4f6; padding: 1px 4px; border-radius: 3px; }
pre { background: #f8f8f8; border: 1px solid #e3e3e3; border-radius: 4px; padding: 8px 10px; overflow: auto;
      font: 12px/1.35 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
p.note { color: #555; max-width: 70em; }
"""


def configfile_texts(paths: Sequence[str | os.PathLike]) -> dict[str, str]:
    """Each config file a run read (--configfile, or the workflow's default), by absolute path, with its text."""
    return {os.path.abspath(p): Path(p).read_text(encoding="utf-8") for p in paths}


def config_yaml(config: Mapping[str, Any]) -> str:
    import yaml

    plain = json.loads(json.dumps(config))  # Snakemake's containers as plain dicts and lists
    return yaml.safe_dump(plain, sort_keys=True, default_flow_style=False, allow_unicode=True, width=110)


def config_page(config: Mapping[str, Any], configfiles: Mapping[str, str], overrides: Mapping[str, Any]) -> str:
    parts = ["<h1>Configuration</h1>",
             '<p class="note">The merged configuration below is what every job of this run saw: the config files '
             "given (in order, later ones overriding earlier ones), then command-line <code>--config</code> "
             "overrides, then the schema's defaults (<code>config/schema.yaml</code>) for what none of them "
             "sets. It is also written as <code class=\"path\">results/config/config.yaml</code>.</p>",
             "<h2>Merged configuration</h2>", f"<pre>{html.escape(config_yaml(config))}</pre>"]
    for i, (path, text) in enumerate(configfiles.items(), 1):
        parts += [f'<h2>Config file {i} of {len(configfiles)}: <code class="path">{html.escape(path)}</code></h2>',
                  f"<pre>{html.escape(text)}</pre>"]
    if not configfiles:
        parts.append("<h2>Config files</h2><p>None (only the command line and the schema's defaults).</p>")
    if overrides:
        parts += ["<h2>Command-line overrides (<code>--config</code>)</h2>",
                  f"<pre>{html.escape(config_yaml(overrides))}</pre>"]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Configuration</title>"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


def config_record(config: Mapping[str, Any], configfiles: Mapping[str, str], overrides: Mapping[str, Any],
                  out_yaml: str, out_html: str) -> None:
    from ..io import atomic_path  # not at the top: the DAG build imports this module, and io imports torch

    with atomic_path(out_yaml) as tmp:
        tmp.write_text(config_yaml(config), encoding="utf-8")
    with atomic_path(out_html) as tmp:
        tmp.write_text(config_page(config, configfiles, overrides), encoding="utf-8")

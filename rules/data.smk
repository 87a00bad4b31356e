# A dataset's data and what it holds. pmoe_backdoor.datafiles uses the standard library only: cheap at DAG-build
# time (the Snakefile puts this workflow's src/ on sys.path).

import copy
import functools
from pathlib import Path

from snakemake.common.configfile import load_configfile

from pmoe_backdoor.datafiles import defining_layer, resolve_config_path, source_digest

SOURCES_WITH_DATA = ("npz", "imagefolder")  # a local file or folder: an input of prepare_data, its content digested


@functools.cache
def config_layers():
    """The config as Snakemake merged it, lowest precedence first, each layer as (the folder its relative paths
    are taken from, its content): the Snakefile's configfile: files, the --configfile files in their order (each
    from its own folder), then --config (from the working directory, where Snakemake runs)."""
    cli = [Path(f).absolute() for f in workflow.config_settings.configfiles]
    directives = [Path(f).absolute() for f in workflow.configfiles]
    if workflow.config_settings.replace_workflow_config:
        directives = []
    files = [f for f in directives if f not in cli] + cli
    layers = [(f.parent, load_configfile(str(f))) for f in files]
    layers.append((Path.cwd(), workflow.config_settings.config))
    return layers


def dataset_path(name):
    """A dataset's `path`, absolute: a relative one is taken from the folder of the config layer that set it
    (the last to set it wins), or from the working directory if no layer did."""
    base = defining_layer(("datasets", name, "path"), config_layers())
    return resolve_config_path(config["datasets"][name]["path"], Path.cwd() if base is None else base)


@functools.cache
def _dataset_spec(name):
    spec = dict(config["datasets"][name])
    if spec.get("source") in SOURCES_WITH_DATA and "path" in spec:
        spec["path"] = dataset_path(name)
        # the content, not the mtime: a file replaced under its old mtime reruns prepare_data and what follows
        spec["digest"] = source_digest(spec["source"], spec["path"])
    return canonical(spec)


def dataset_spec(name):
    """The dataset's config block for prepare_data: keys sorted, `path` absolute and, for an npz file or an image
    folder, `digest`, its content's sha256 (computed once per Snakemake process; the job checks it again)."""
    return copy.deepcopy(_dataset_spec(name))


def dataset_input(name):
    """The file or folder prepare_data reads (none for a download or synthetic data)."""
    block = config["datasets"][name]
    return dataset_path(name) if block.get("source") in SOURCES_WITH_DATA and "path" in block else []


rule prepare_data:
    """Download (torchvision), read (npz, image folder) or generate (synthetic) a dataset into the canonical npz."""
    input:
        data=lambda wc: dataset_input(wc.dataset),
    output:
        f"{RESULTS}/data/{{dataset}}.npz",
    params:
        spec=lambda wc: dataset_spec(wc.dataset),
    log:
        f"{RESULTS}/logs/prepare_data/{{dataset}}.log",
    resources:
        runtime=120,
        mem_mb=8000,
    conda:
        "../envs/pmoe.yaml"
    script:
        "../workflow/scripts/data/prepare_data.py"
